"""End to end on SmolLM2-135M-Instruct: examples/worker_loop.py, a plain PyTorch decode loop,
gives token for token what `hf.generate` gives through the sidecar (and, greedy, what Hugging
Face's own `generate` gives), for plain sequences, beams and forks, inline and by shared memory; and
it rides out a restart of a `--state-dir` service by resending the step it lost."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

from sampler_client import SamplerClient, hf
from tests.e2e.test_replay_smollm2 import RestartingModel

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "worker_loop.py"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def worker_loop():
    spec = importlib.util.spec_from_file_location("worker_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def prompts(smollm2) -> list[list[int]]:
    return [hf.chat_ids(smollm2[1], p)[0].tolist() for p in PROMPTS]


@pytest.mark.e2e
def test_greedy_equals_hf_generate_and_hugging_faces_own(smollm2, server, client, worker_loop,
                                                         prompts):
    """Inline bytes here (`client`, transport "auto", sends shared memory: the groups test)."""
    pytest.importorskip("transformers")
    model, tokenizer = smollm2
    with SamplerClient(server.address, transport="inline") as inline:
        got = worker_loop.decode(model, tokenizer, prompts, inline, max_new_tokens=MAX_NEW_TOKENS)
    assert got == hf.generate(model, prompts, client, policy="greedy",
                              max_new_tokens=MAX_NEW_TOKENS)
    for prompt, tokens in zip(PROMPTS, got):  # Hugging Face's own greedy, one prompt at a time
        ids = hf.chat_ids(tokenizer, prompt)
        own = model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        assert tokens == own[0, ids.shape[1]:].tolist()
    assert len(server.core.store) == 0  # released


@pytest.mark.e2e
@pytest.mark.parametrize("options", [dict(num_beams=3), dict(policy="creative", n=3, seed=11)],
                         ids=["beams", "forks"])
def test_groups_follow_parent_rows_as_hf_generate_does(smollm2, client, worker_loop, prompts,
                                                       options):
    """Beams reorder the KV cache rows, forks fan one prompt row out to three."""
    pytest.importorskip("transformers")
    model, tokenizer = smollm2
    got = worker_loop.decode(model, tokenizer, prompts[:1], client,
                             max_new_tokens=MAX_NEW_TOKENS, **options)
    assert got == hf.generate(model, prompts[:1], client, max_new_tokens=MAX_NEW_TOKENS,
                              **options)
    assert len(got) == options.get("n", 1)


class StatefulService:
    """A service with a --state-dir, in this process; `restart` stops it and serves its state
    again on the same port, as a restarted sidecar container does."""

    def __init__(self, start_server, state_dir: Path):
        self.start_server, self.state_dir = start_server, state_dir
        self.server = start_server(state_dir=state_dir)
        self.address = self.server.address

    def restart(self) -> None:
        self.server.stop(0)
        self.server = self.start_server(state_dir=self.state_dir, port=self.server.port)


@pytest.mark.e2e
def test_a_lost_step_is_resent_with_its_step_number(smollm2, worker_loop, prompts, tmp_path,
                                                    start_server, caplog):
    """replay=False: the worker itself resends the step that found the service away; the
    service restored its sequences from its --state-dir, so the same step numbers go on and
    the tokens are the uninterrupted run's."""
    pytest.importorskip("transformers")
    model, tokenizer = smollm2
    service = StatefulService(start_server, tmp_path)
    options = dict(policy="creative", seed=3, max_new_tokens=MAX_NEW_TOKENS)
    with SamplerClient(service.address, transport="inline", replay=False) as client:
        expected = worker_loop.decode(model, tokenizer, prompts, client, **options)
        with caplog.at_level(logging.WARNING, logger="worker_loop"):
            got = worker_loop.decode(RestartingModel(model, service, at=4), tokenizer, prompts,
                                     client, **options)
    resent = [r.getMessage() for r in caplog.records if r.name == "worker_loop"]
    assert len(resent) == 1 and resent[0].startswith("step 3 failed (UNAVAILABLE")
    assert got == expected
