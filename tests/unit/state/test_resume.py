"""Resume records: a sequence or group re-created from its tokens and its last record continues
exactly as the uninterrupted one, and a record that does not fit is refused naming its field."""
from __future__ import annotations

import base64
import dataclasses
import math
import struct

import pytest
import torch

from sampler_service.engine import Engine
from sampler_service.errors import FailedPrecondition, InvalidArgument
from sampler_service.groups import GroupRecord
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.service import SamplerCore, SequenceRequest, StepRow
from sampler_service.state.resume import Reader, ResumePoint, packed_doubles
from sampler_service.state.store import SequenceStore
from tests.unit.helpers import TOY_VOCABULARY, random_logits

VOCAB = 300
#: Outputs the structured specs allow (spelt by TOY_VOCABULARY, the tokenizer "toy"; 5+ tokens).
CHOICES = ["a-b-c-a", "b-a-b-x", "1-2-1-2", "x-ab-c", "x-ab-12"]
STEPS = 9
SPECS = {
    "mirostat": {"chain": [{"temperature": {"temperature": 0.9}}],
                 "select": {"mirostat": {"tau": 3.0, "eta": 0.3}}, "defaults": {"seed": 3}},
    "penalties": {"chain": [{"repetition_penalty": {"penalty": 1.3}},
                            {"frequency_penalty": {"penalty": 0.5}},
                            {"no_repeat_ngram": {"size": 2}}, {"temperature": {"temperature": 1.5}}],
                  "select": "sample", "defaults": {"seed": 4}},
    "entropy-adaptive": {"chain": [{"edt": {"t0": 0.9}}], "select": "sample",
                         "defaults": {"seed": 6}},
    "beam": {"chain": [], "select": {"beam": {"width": 3}}, "defaults": {"max_tokens": 8}},
    "diverse-beam": {"chain": [], "select": {"beam": {"width": 4, "groups": 2,
                                                      "diversity_penalty": 0.5}},
                     "defaults": {"max_tokens": 8}},
    "forks": {"chain": [{"temperature": {"temperature": 1.2}}], "select": "sample",
              "defaults": {"n": 3, "max_tokens": 8, "seed": 5}},
    "cot": {"chain": [], "select": {"cot": {"k": 3}}, "defaults": {"max_tokens": 8}},
    # the grammar matcher is rebuilt from the tokens, per row and per hypothesis
    "structured": {"chain": [{"structured": {"choice": CHOICES}},
                             {"temperature": {"temperature": 1.5}}], "select": "sample", "defaults": {"seed": 7, "n": 2, "max_tokens": 8}},
    "structured-beam": {"chain": [{"structured": {"choice": CHOICES}}],
                        "select": {"beam": {"width": 3}}, "defaults": {"max_tokens": 8}},
}


def new_core() -> SamplerCore:
    core = SamplerCore(PolicyRegistry.from_files(), SequenceStore(), Engine(torch.device("cpu")))
    core.tokenizers.register(TOY_VOCABULARY, "toy")
    return core


def request(name: str, resume: ResumePoint | None = None, **changes) -> SequenceRequest:
    tokenizer = "toy" if name.startswith("structured") else ""
    return dataclasses.replace(SequenceRequest("s", policy_spec=SPECS[name], prompt_ids=(1, 2, 3),
                                               eos_token_ids=(0,), resume=resume,
                                               tokenizer=tokenizer), **changes)


#: Steps at which EOS (id 0) is made a close second in every row, so that beams finish
#: hypotheses into their slots and a CoT branch ends early, before the restarts.
EOS_STEPS = (2, 3)


def step(core: SamplerCore, index: int, eos_near_top: bool = False):
    """One step of "s" on logits seeded by the step's index; its answer and resume record."""
    rows = core.read("s", lambda entry: entry.running_rows)
    logits = random_logits(index, rows, VOCAB)
    if eos_near_top and index in EOS_STEPS:
        logits[:, 0] = logits.amax(dim=1) - 0.3
    answer, = core.step([StepRow("s")] * rows, logits, resume_records=True)
    return answer


def summary(answer) -> list[tuple]:
    rows = answer.record.rows
    return [(r.parent, r.token_id, r.score, r.finished, r.finish_reason) for r in rows]


def run(name: str, steps: int, restart_at: int | None = None) -> list[list[tuple]]:
    """The step summaries of `steps` steps; at `restart_at` a fresh core re-creates "s" from
    the tokens so far and the last record, and the steps go on there."""
    core = new_core()
    core.create_sequences([request(name)])
    summaries, tokens, stats, last = [], [], [], None
    for index in range(steps):
        if index == restart_at:
            core = new_core()
            group = isinstance(last.record, GroupRecord)
            point = ResumePoint(() if group else tuple(tokens), () if group else tuple(stats),
                                last.resume)
            core.create_sequences([request(name, point)])
        last = step(core, index, eos_near_top=name in ("beam", "diverse-beam", "cot"))
        summaries.append(summary(last))
        if not isinstance(last.record, GroupRecord):
            tokens.append(last.record.token_id)
            stats.append((last.record.entropy, last.record.varentropy))
        if all(r.finished for r in last.record.rows):
            break
    return summaries


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("restart_at", [1, 2, 5])
def test_a_resumed_sequence_continues_as_the_uninterrupted_one(name, restart_at):
    if name.startswith("structured"):
        pytest.importorskip("xgrammar")
    uninterrupted = run(name, STEPS)
    assert len(uninterrupted) > restart_at
    if name in ("beam", "diverse-beam"):  # hypotheses finished into slots before the restarts
        core = new_core()
        core.create_sequences([request(name)])
        state = [step(core, i, eos_near_top=True) for i in range(EOS_STEPS[1] + 1)][-1].resume.state
        assert any(slot["finish_reason"] == 1 for g in state["groups"] for slot in g["slots"])
    assert run(name, STEPS, restart_at) == uninterrupted


def test_the_record_carries_what_tokens_cannot_rebuild():
    """Mirostat's mu and the entropy summaries come back exactly; without the record's mu the
    sequence would start again from 2 tau."""
    core = new_core()
    core.create_sequences([request("mirostat")])
    answers = [step(core, i) for i in range(4)]
    before = core.read("s", lambda s: s)
    assert before.resume_record() == answers[-1].resume
    again = new_core()
    point = ResumePoint(tuple(before.output_ids), tuple(zip(before.entropies, before.varentropies)),
                        answers[-1].resume)
    after, = again.create_sequences([request("mirostat", point)])
    for name in ("output_ids", "entropies", "varentropies", "ema_entropy", "ema_varentropy",
                 "entropy_sum", "varentropy_sum", "seed", "processor_state"):
        assert getattr(after, name) == getattr(before, name), name
    assert after.processor_state["mirostat"] != 2 * 3.0
    assert after.history.output_counts()[0].tolist() == before.history.output_counts()[0].tolist()


def test_a_seed_drawn_by_the_service_comes_back_with_the_record():
    core = new_core()
    core.create_sequences([request("penalties", policy_spec={**SPECS["penalties"], "defaults": {}})])
    answer = step(core, 0)
    drawn = core.read("s", lambda s: s.seed)
    assert answer.resume.seed == drawn
    again = new_core()
    resumed, = again.create_sequences([request(
        "penalties", ResumePoint((answer.record.token_id,), (), answer.resume),
        policy_spec={**SPECS["penalties"], "defaults": {}})])
    assert resumed.seed == drawn


def test_stats_left_out_read_as_nan_in_the_history():
    core = new_core()
    core.create_sequences([request("penalties")])
    answer = step(core, 0)
    resumed, = new_core().create_sequences([request(
        "penalties", ResumePoint((answer.record.token_id,), (), answer.resume))])
    assert math.isnan(resumed.entropies[0]) and resumed.entropy_sum == answer.record.entropy


def recorded(name: str = "penalties", steps: int = 2):
    core = new_core()
    core.create_sequences([request(name)])
    answers = [step(core, i) for i in range(steps)]
    return answers, core.read("s", lambda s: s)


def refusal(name: str, point: ResumePoint, **changes):
    with pytest.raises((InvalidArgument, FailedPrecondition)) as err:
        new_core().create_sequences([request(name, point, **changes)])
    return err.value


def test_malformed_points_are_refused_naming_the_field():
    answers, state = recorded()
    tokens, record = tuple(state.output_ids), answers[-1].resume
    where = "sequences[0].resume"
    cases = [
        (ResumePoint(tokens, (), None), f"{where}.record"),
        (ResumePoint(tokens[:1], (), record), f"{where}.record.position"),
        (ResumePoint(tokens, ((1.0, 1.0),), record), f"{where}.stats"),
        (ResumePoint(tokens, (), dataclasses.replace(record, version=2)), f"{where}.record.version"),
        (ResumePoint(tokens, (), dataclasses.replace(record, sequence_id="t")),
         f"{where}.record.sequence_id"),
        (ResumePoint(tokens, (), dataclasses.replace(record, state={**record.state,
                                                                   "ema_entropy": "x"})),
         f"{where}.record.state.ema_entropy"),
        (ResumePoint(tokens, (), dataclasses.replace(record, state={**record.state,
                                                                   "entropy_sum": math.inf})),
         f"{where}.record.state.entropy_sum"),
        (ResumePoint(tokens, (), dataclasses.replace(record, state={
            **record.state, "memory": {"mirostat": 1.0}})), f"{where}.record.state.memory.mirostat"),
        (ResumePoint(tokens, (), dataclasses.replace(record, state={
            k: v for k, v in record.state.items() if k != "varentropy_sum"})),
         f"{where}.record.state.varentropy_sum"),
        (ResumePoint((0,) + tokens[1:], (), record), f"{where}.output_ids[1]"),  # after EOS
    ]
    for point, field in cases:
        error = refusal("penalties", point)
        assert isinstance(error, InvalidArgument) and error.field == field, (field, error)


def test_a_changed_policy_or_seed_is_refused():
    answers, state = recorded()
    point = ResumePoint(tuple(state.output_ids), (), answers[-1].resume)
    changed = {**SPECS["penalties"], "chain": [{"temperature": {"temperature": 1.4}}]}
    error = refusal("penalties", point, policy_spec=changed)
    assert isinstance(error, FailedPrecondition) and error.field == "sequences[0].resume.record.policy_hash"
    reseeded = {**SPECS["penalties"], "defaults": {"seed": 99}}
    error = refusal("penalties", point, policy_spec=reseeded)
    assert isinstance(error, InvalidArgument) and error.field == "sequences[0].resume.record.seed"


def test_group_records_are_checked_too():
    answers, _ = recorded("beam", 3)
    record = answers[-1].resume
    where = "sequences[0].resume"
    error = refusal("beam", ResumePoint((5,), (), record))
    assert error.field == f"{where}.output_ids"
    rows = record.state["groups"][0]["rows"]
    short = {**record.state, "groups": [{**record.state["groups"][0],
                         "rows": [{**rows[0], "output_ids": rows[0]["output_ids"][:-1]}] + rows[1:]}]}
    error = refusal("beam", ResumePoint((), (), dataclasses.replace(record, state=short)))
    assert error.field == f"{where}.record.state.groups[0].rows[0].output_ids"
    no_slots = {**record.state, "groups": [{k: v for k, v in record.state["groups"][0].items() if k != "slots"}]}
    error = refusal("beam", ResumePoint((), (), dataclasses.replace(record, state=no_slots)))
    assert error.field == f"{where}.record.state.groups[0].slots"
    done = {**record.state, "groups": [{**record.state["groups"][0], "done": True}]}
    error = refusal("beam", ResumePoint((), (), dataclasses.replace(record, state=done)))
    assert "finished" in error.message


GROUPS = ("beam", "diverse-beam", "forks", "cot")


def group_views(entry) -> tuple[list, list]:
    """A group's running rows and finished hypotheses, histories included."""
    return entry.running(), entry.hypotheses()


def stepped_group(name: str, steps: int = 4):
    """A group after `steps` steps (EOS near the top at EOS_STEPS: beams fill slots, a CoT
    branch may end) and its last resume record."""
    core = new_core()
    core.create_sequences([request(name)])
    answers = [step(core, i, eos_near_top=True) for i in range(steps)]
    return core.read("s", group_views), answers[-1].resume


def without_history(data):
    """Plain data with every `entropies` and `varentropies` key removed (an older record)."""
    if isinstance(data, dict):
        return {k: without_history(v) for k, v in data.items()
                if k not in ("entropies", "varentropies")}
    if isinstance(data, list):
        return [without_history(v) for v in data]
    return data


@pytest.mark.parametrize("name", GROUPS)
def test_a_group_record_carries_every_rows_and_hypothesis_history(name):
    (running, hypotheses), record = stepped_group(name)
    assert running and all(len(h.entropies) == len(h.token_ids) > 0 for h in running)
    if name in ("beam", "diverse-beam"):
        assert hypotheses  # slots filled before the record
    resumed, = new_core().create_sequences([request(name, ResumePoint((), (), record))])
    assert group_views(resumed) == (running, hypotheses)


@pytest.mark.parametrize("name", GROUPS)
def test_a_group_record_without_histories_restores_nan(name):
    """A record written before histories travelled: each token's statistics read NaN."""
    (running, hypotheses), record = stepped_group(name)
    old = dataclasses.replace(record, state=without_history(record.state))
    resumed, = new_core().create_sequences([request(name, ResumePoint((), (), old))])
    again_running, again_hypotheses = group_views(resumed)
    for before, after in zip(running + hypotheses, again_running + again_hypotheses):
        assert after.token_ids == before.token_ids
        assert len(after.entropies) == len(after.varentropies) == len(after.token_ids)
        assert all(math.isnan(x) for x in after.entropies + after.varentropies)
    assert len(again_running + again_hypotheses) == len(running + hypotheses)


def test_malformed_histories_are_refused_naming_the_field():
    _, record = stepped_group("beam")
    where = "sequences[0].resume.record.state.groups[0]"
    group = record.state["groups"][0]
    row, slot = group["rows"][0], group["slots"][0]
    short = packed_doubles(range(len(row["output_ids"]) - 1))
    cases = [
        ({"rows": [{**row, "entropies": short}] + group["rows"][1:]}, f"{where}.rows[0].entropies"),
        ({"rows": [{**row, "varentropies": "not base64!"}] + group["rows"][1:]},
         f"{where}.rows[0].varentropies"),
        ({"rows": [{**row, "varentropies": [1.0] * len(row["output_ids"])}] + group["rows"][1:]},
         f"{where}.rows[0].varentropies"),
        ({"rows": [{k: v for k, v in row.items() if k != "varentropies"}] + group["rows"][1:]},
         f"{where}.rows[0].varentropies"),
        ({"slots": [{**slot, "entropies": packed_doubles([math.inf] * len(slot["token_ids"]))}]
          + group["slots"][1:]}, f"{where}.slots[0].entropies[0]"),
    ]
    for change, field in cases:
        state = {**record.state, "groups": [{**group, **change}]}
        error = refusal("beam", ResumePoint((), (), dataclasses.replace(record, state=state)))
        assert isinstance(error, InvalidArgument) and error.field == field, (field, error)


def test_histories_travel_as_packed_doubles():
    values = [0.0, 1.25, math.nan, 3.0e-9]
    data = Reader({"entropies": packed_doubles(values), "varentropies": packed_doubles(values)},
                  "state")
    assert packed_doubles(values) == base64.b64encode(struct.pack("<4d", *values)).decode()
    (h0, v0), (h1, v1), (h2, v2), (h3, v3) = data.history(4)
    assert [h0, h1, h3] == [v0, v1, v3] == [0.0, 1.25, 3.0e-9]
    assert math.isnan(h2) and math.isnan(v2)
    assert Reader({}, "state").history(4) == []  # an older record: the history reads NaN


def test_a_retried_step_answers_the_state_after_it():
    core = new_core()
    core.create_sequences([request("penalties")])
    first = step(core, 0)
    again, = core.step([StepRow("s", step=0)], random_logits(0, 1, VOCAB), resume_records=True)
    assert again.record == first.record and again.resume == first.resume
