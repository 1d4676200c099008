"""Plug-ins: the example package's `logit_softcap` (installed in the venv by the Makefile) in a
served policy, and the start-up checks that reject unusable entry points."""
from __future__ import annotations

import math
import subprocess
import sys
from importlib.metadata import EntryPoint, entry_points

import pytest
import torch

from sampler_client import SamplerClient
from sampler_plugin_example import LogitSoftcap
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.params import Param
from sampler_service.policy.plugins import GROUP, PLUGINS, PluginError, load_plugins
from sampler_service.policy.processors import PROCESSORS, Processor, RowBatch, Selector
from sampler_service.policy.selectors import SELECTORS

LOGITS = [3.0, 1.0, 0.0, -2.0]
SOFTCAP = {"chain": [{"logit_softcap": {"cap": 2.0}}], "select": "greedy"}
SAMPLED = {**SOFTCAP, "select": "sample", "defaults": {"seed": 3}}


def softcapped_logprobs(logits: list[float], cap: float) -> list[float]:
    """log softmax(c · tanh(l / c)), by hand."""
    capped = [cap * math.tanh(l / cap) for l in logits]
    normalizer = math.log(sum(math.exp(v) for v in capped))
    return [v - normalizer for v in capped]


# -- test-local stages the loader must reject (or, for Halve, accept) --------------------------
class Halve(Processor):
    """A well-formed plug-in stage: l' = l / 2."""

    key = "halve_for_test"
    role = "transform"

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        candidates.values.div_(2)


class ClashingTopK(Halve):
    key = "top_k"


class ClashingGreedy(Selector):
    key = "greedy"

    def select(self, candidates: Candidates, args: dict[str, torch.Tensor],
               batch: RowBatch) -> torch.Tensor:
        return candidates.argmax()


class ClashingSample(Halve):
    """A processor taking a selector's key."""

    key = "sample"


class OtherHalve(Halve):
    """Another class under Halve's key."""


class NotAStage:
    key = "not_a_stage"


class Abstract(Processor):
    key = "abstract"
    role = "transform"


class BadParams(Halve):
    key = "bad_params"
    params = ({"name": "cap"},)


class TwiceNamed(Halve):
    key = "twice_named"
    params = (Param("x", "float", 0.0, 0.0, "x"), Param("x", "float", 0.0, 0.0, "x again"))


class NoRole(Processor):
    key = "no_role"

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        candidates.values.neg_()


class NeedsArguments(Halve):
    key = "needs_arguments"

    def __init__(self, scale: float):
        self.scale = scale


def entry(name: str, target: str) -> EntryPoint:
    """A real entry point of GROUP loading `target` (a name in this module, or a full path)."""
    return EntryPoint(name, target if ":" in target or "." in target else f"{__name__}:{target}",
                      GROUP)


# -- the example package through the server ----------------------------------------------------
def test_the_server_loads_the_installed_example_at_start_up(server):
    assert server.plugins == {"logit_softcap": LogitSoftcap}
    assert PROCESSORS["logit_softcap"] is LogitSoftcap and PLUGINS["logit_softcap"] is LogitSoftcap


def test_a_sequence_steps_with_the_plugin_stage(client):
    greedy = client.create_sequence(policy=SOFTCAP, prompt_ids=[1])
    assert greedy.step(torch.tensor(LOGITS)).token_id == 0
    sampled = client.create_sequence(policy=SAMPLED, prompt_ids=[1])
    choice = sampled.step(torch.tensor(LOGITS), processed_logprobs=True)
    capped = softcapped_logprobs(LOGITS, 2.0)[choice.token_id]
    raw = LOGITS[choice.token_id] - math.log(sum(math.exp(l) for l in LOGITS))
    assert choice.processed_logprob == pytest.approx(capped, abs=1e-5)
    assert choice.logprob == pytest.approx(raw, abs=1e-5)  # raw logprobs are the uncapped ones
    assert abs(capped - raw) > 0.1


def test_preview_returns_the_softcapped_distribution(client):
    survivors = client.preview(torch.tensor(LOGITS), policy=SAMPLED)
    expected = [math.exp(v) for v in softcapped_logprobs(LOGITS, 2.0)]
    assert [t for t, _ in survivors] == [0, 1, 2, 3]
    assert [p for _, p in survivors] == pytest.approx(expected, abs=1e-6)
    assert survivors[0][1] < math.exp(3.0) / sum(math.exp(l) for l in LOGITS)  # a flatter head


def test_a_policy_file_may_name_a_plugin_stage(start_server, tmp_path):
    path = tmp_path / "capped.yaml"
    path.write_text("policies:\n  capped:\n    chain:\n      - logit_softcap: {cap: 2.0}\n"
                    "    select: sample\n")
    served = start_server(policies=path)
    with SamplerClient(served.address) as sdk:
        survivors = sdk.preview(torch.tensor(LOGITS), policy="capped")
    assert [p for _, p in survivors] == pytest.approx(
        [math.exp(v) for v in softcapped_logprobs(LOGITS, 2.0)], abs=1e-6)


def test_the_generated_docs_leave_plugins_out():
    assert "logit_softcap" in entry_points(group=GROUP).names
    docs = subprocess.run([sys.executable, "-m", "sampler_service.docgen"], check=True,
                          capture_output=True, text=True).stdout
    assert "### `top_k`" in docs and "logit_softcap" not in docs


# -- the loader's checks -----------------------------------------------------------------------
@pytest.mark.parametrize("name, target, complaint", [
    ("top_k", "ClashingTopK", "key 'top_k' clashes with a built-in processor"),
    ("greedy", "ClashingGreedy", "key 'greedy' clashes with a built-in selector"),
    ("sample", "ClashingSample", "key 'sample' clashes with a built-in selector"),
    ("not_a_stage", "NotAStage", "not a subclass of sampler_service.policy.processors.base"),
    ("a_function", "softcapped_logprobs", "loads <function softcapped_logprobs"),
    ("a_module", __name__, f"loads <module {__name__!r}"),
    ("abstract", "Abstract", "Abstract is abstract (does not define apply)"),
    ("missing", "no_such_module_for_plugins:Stage",
     "failed to load: ModuleNotFoundError: No module named 'no_such_module_for_plugins'"),
    ("missing_class", "NoSuchClass", "failed to load: AttributeError"),
    ("halve", "Halve", "Halve.key is 'halve_for_test'; it must be the entry point's name 'halve'"),
    ("bad_params", "BadParams", "BadParams.params must be a tuple of"),
    ("twice_named", "TwiceNamed", "names a parameter twice: ['x', 'x']"),
    ("no_role", "NoRole", "NoRole.role must be one of filter, transform, constraint, monitor"),
    ("needs_arguments", "NeedsArguments", "NeedsArguments() failed: TypeError"),
])
def test_an_unusable_entry_point_fails_the_load_naming_it(name, target, complaint, caplog):
    point = entry(name, target)
    before = (dict(PROCESSORS), dict(SELECTORS))
    with pytest.raises(PluginError) as raised:
        load_plugins([point])
    assert f"entry point {name} = {point.value!r} (group {GROUP})" in str(raised.value)
    assert complaint in str(raised.value)
    assert (dict(PROCESSORS), dict(SELECTORS)) == before
    assert [r.levelname for r in caplog.records if point.value in r.getMessage()] == ["ERROR"]


def test_one_bad_entry_point_registers_none_and_every_bad_one_is_named():
    points = [entry("halve_for_test", "Halve"), entry("top_k", "ClashingTopK"),
              entry("not_a_stage", "NotAStage")]
    with pytest.raises(PluginError, match=r"\(2 unusable entry points\)") as raised:
        load_plugins(points)
    assert "top_k" in str(raised.value) and "not_a_stage" in str(raised.value)
    assert "halve_for_test" not in PROCESSORS and "halve_for_test" not in PLUGINS


def test_two_plugins_under_one_key_clash():
    with pytest.raises(PluginError, match="key 'halve_for_test' clashes with another plug-in "
                                          rf"\({__name__}.Halve\)"):
        load_plugins([entry("halve_for_test", "Halve"), entry("halve_for_test", "OtherHalve")])
    assert "halve_for_test" not in PROCESSORS


def test_loading_the_installed_plugins_again_changes_nothing(server):
    registered = dict(PROCESSORS)
    assert load_plugins() == {"logit_softcap": LogitSoftcap}
    assert PROCESSORS == registered


def test_an_unusable_installed_plugin_fails_the_start(start_server, tmp_path, monkeypatch):
    """A distribution on sys.path declaring a clashing entry point: the server does not start."""
    info = tmp_path / "clashing_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clashing-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\ntop_k = {__name__}:ClashingTopK\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=rf"entry point top_k = '{__name__}:ClashingTopK'.*"
                                          "clashes with a built-in processor"):
        start_server()
