"""StepRunner: a batch of requests decoded into one buffer, checked in one pass, stepped as
one engine call; each request answered as if alone, a bad one failing alone."""
from __future__ import annotations

import pytest
import torch

from sampler_client.requests import step_request
from sampler_service.engine import Engine
from sampler_service.errors import InvalidArgument
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.server.steps import StepRunner, StepWork
from sampler_service.service import SamplerCore, SequenceRequest
from sampler_service.state import SequenceStore

VOCAB = 300


def runner_with(ids: list[str], policy: str = "creative") -> StepRunner:
    core = SamplerCore(PolicyRegistry.from_files(), SequenceStore(), Engine(torch.device("cpu")))
    core.create_sequences([SequenceRequest(sid, policy=policy, params={"seed": ord(sid[-1])})
                           for sid in ids])  # a sequence's seed depends on its id alone
    return StepRunner(core, None)


def requests_for(ids: list[str], logits: list[torch.Tensor], deadline: float | None = None):
    return [StepWork(step_request([(sid, None, None)], row, processed_logprobs=True), deadline)
            for sid, row in zip(ids, logits)]


def test_a_batch_answers_what_each_request_gets_alone():
    ids = [f"s{i}" for i in range(5)]
    logits = [torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(i)).to(dtype)
              for i, dtype in enumerate([torch.float32, torch.float16, torch.bfloat16,
                                         torch.float32, torch.float32])]
    together = runner_with(ids)(requests_for(ids, logits))
    alone = runner_with(ids)
    for request, answer in zip(requests_for(ids, logits), together):
        assert alone([request])[0] == answer


def test_a_bad_request_fails_alone_and_the_others_are_answered():
    ids = ["a", "b", "c"]
    logits = [torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    logits[1][0, 7] = float("nan")
    answers = runner_with(ids)(requests_for(ids, logits))
    assert isinstance(answers[1], InvalidArgument) and answers[1].field == "logits"
    clean = runner_with(["a", "c"])(requests_for(["a", "c"], [logits[0], logits[2]]))
    assert [answers[0], answers[2]] == clean


def test_requests_of_different_vocabularies_share_a_batch():
    ids = ["a", "b"]
    logits = [torch.randn(1, VOCAB), torch.randn(1, VOCAB + 5)]
    answers = runner_with(ids, "greedy")(requests_for(ids, logits))
    assert [a.choices[0].token_id for a in answers] == [int(l.argmax()) for l in logits]


def test_each_sequence_of_a_mixed_vocabulary_batch_keeps_its_own_vocabulary():
    """Each sequence records the vocabulary of its own request (not the batch's last one), so
    its next step with the same vocabulary is accepted."""
    ids = ["a", "b"]
    runner = runner_with(ids, "greedy")
    for step in range(2):
        logits = [torch.randn(1, VOCAB), torch.randn(1, VOCAB + 5)]
        answers = runner(requests_for(ids, logits))
        assert [a.choices[0].token_id for a in answers] == [int(l.argmax()) for l in logits]
        assert [a.choices[0].step for a in answers] == [step, step]


def test_small_batches_run_on_one_intra_op_thread_and_the_count_comes_back():
    from sampler_service.server.steps import intra_op_threads
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with intra_op_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("the count comes back even so")
    assert torch.get_num_threads() == before


def test_only_small_batches_run_inline_and_only_while_the_engine_thread_is_idle():
    ids = [f"s{i}" for i in range(8)]
    runner, idle = runner_with(ids, "greedy"), [True]
    runner.engine_idle = lambda: idle[0]
    one_row = requests_for(ids[:1], [torch.randn(1, VOCAB)])
    assert runner.runs_inline(one_row)
    assert not runner.runs_inline(requests_for(ids, [torch.randn(1, VOCAB)] * 8))  # 8 rows
    assert not runner.runs_inline(requests_for(ids[:1], [torch.randn(1, 1 << 18)]))
    idle[0] = False
    assert not runner.runs_inline(one_row)
    assert not runner_with(ids[:1]).runs_inline(one_row)  # no engine_idle: never


def test_a_step_whose_deadline_passed_changes_nothing():
    """Planned after its caller's deadline: DEADLINE_EXCEEDED and no state changed; the same
    step sent again in time is answered as if the first had never come."""
    import time

    from sampler_service.errors import DeadlineExceeded
    runner = runner_with(["a", "b"])
    logits = [torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    late, on_time = runner(requests_for(["a"], logits[:1], deadline=time.monotonic() - 1.0)
                           + requests_for(["b"], logits[1:], deadline=time.monotonic() + 60))
    assert isinstance(late, DeadlineExceeded) and "nothing changed" in late.message
    assert not isinstance(on_time, Exception)
    assert runner.core.read("a", lambda s: list(s.output_ids)) == []
    again, = runner(requests_for(["a"], logits[:1]))
    fresh, = runner_with(["a"])(requests_for(["a"], logits[:1]))
    assert again.choices[0].token_id == fresh.choices[0].token_id


@pytest.mark.parametrize("broken", ["unknown sequence", "nan logits", "wrong shape"])
def test_a_failed_request_keeps_no_cycle_holding_the_batch(broken):
    """A request's error is handed back without its traceback, whose frames would hold the
    whole batch (every request's logits and the batch buffer) in a cycle that only the
    garbage collector frees, late: the soak's service grew by gigabytes before."""
    import gc

    ids = ["a", "b"]
    logits = [torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    works = requests_for(ids, logits)
    if broken == "unknown sequence":
        works[1].request.rows[0].sequence_id = "gone"
    elif broken == "nan logits":
        works[1].request.logits.raw = torch.full((1, VOCAB), float("nan")).numpy().tobytes()
    else:
        works[1].request.logits.shape[:] = [2, VOCAB // 2]
    runner = runner_with(ids)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        answers = runner(works)
        assert isinstance(answers[1], Exception) and answers[1].__traceback__ is None
        del answers
        gc.collect()
        kept = {type(o).__name__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not kept & {"StepCall", "_Decoded", "StepLogits", "frame"}, kept
