"""The constraint family (`constraints.py`): logit_bias, allowed_token_ids, bad_words,
no_repeat_ngram, exponential_decay_length_penalty, suppress_tokens, forced_tokens.

Each processor on tiny hand-computed rows, off rows and all-off batches, a mixed batch against
each row alone, a sparse batch (after top_k) against a dense one, and, where Hugging Face has
the processor, against it on the same input ids (prompt + output).
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from sampler_service.engine import Engine
from sampler_service.errors import InvalidArgument
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.processors import CANONICAL_ORDER, PROCESSORS, RowBatch, TopK
from sampler_service.policy.processors.constraints import (AllowedTokenIds, BadWords,
                                                           ExponentialDecayLengthPenalty,
                                                           ForcedTokens, LogitBias, NoRepeatNGram,
                                                           SuppressTokens)
from sampler_service.policy.registry import shipped_policies
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.spec import parse_policy, resolve, resolve_flat
from sampler_service.state import SequenceState

CPU = torch.device("cpu")
INF = math.inf
_DTYPES = {"float": torch.float32, "int": torch.int64, "bool": torch.bool}


def make_state(prompt=(), output=(), eos=(), sid="s") -> SequenceState:
    return SequenceState(sequence_id=sid, policy=resolve_flat({}), prompt_ids=tuple(prompt),
                         seed=0, eos_token_ids=frozenset(eos), output_ids=list(output))


def stage_args(cls, rows: int, values: dict) -> dict:
    """Each parameter of `cls` for `rows` rows as the engine hands it over: `values` maps a
    parameter to one raw value per row (validated like a spec); others take their default."""
    args = {}
    for p in cls.params:
        given = values.get(p.name)
        column = [p.validate(v, p.name) for v in given] if given is not None else [p.default] * rows
        args[p.name] = (torch.tensor(column, dtype=_DTYPES[p.kind]) if p.kind in _DTYPES
                        else column)
    return args


def run(cls, logits, states=None, k=None, **values):
    """`cls` on `logits` ([V] or [R, V]), after a top_k with one k per row when `k` is given.
    Returns (dense processed logits [R, V], the batch, the candidates)."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    rows = logits.shape[0]
    states = states if states is not None else [make_state() for _ in range(rows)]
    candidates = Candidates(logits.clone())
    batch = RowBatch(states, CPU)
    if k is not None:
        TopK().apply(candidates, {"k": torch.tensor(k)}, batch)
    cls().apply(candidates, stage_args(cls, rows, values), batch)
    return candidates.to_dense(), batch, candidates


def sparse_and_dense(cls, logits, states, k, **values):
    """(sparse, dense): `cls` after top_k(k) on every row (the batch turns sparse), and on the
    same rows plus an extra row with top_k and `cls` off (the batch stays dense)."""
    rows = logits.shape[0]
    sparse, _, candidates = run(cls, logits, states, k=[k] * rows, **values)
    assert not candidates.dense
    offs = {p.name: p.plain(p.off) for p in cls.params}
    padded_values = {name: list(v) + [offs[name]] for name, v in values.items()}
    dense, _, candidates = run(cls, torch.cat([logits, logits[:1]]), states + [make_state()],
                               k=[k] * rows + [0], **padded_values)
    assert candidates.dense
    assert torch.equal(dense[-1], logits[0])  # the off row
    return sparse, dense[:-1]


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def kept(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


def random_logits(seed: int, rows: int = 4, vocab: int = 64) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def assert_off(cls, rows: int = 3, vocab: int = 16, **values):
    """A batch whose parameter is off for every row is returned untouched (the very tensor)."""
    logits = random_logits(7, rows, vocab)
    candidates = Candidates(logits)
    cls().apply(candidates, stage_args(cls, rows, values),
                RowBatch([make_state((1, 2), [3, 4], eos=(0,)) for _ in range(rows)], CPU))
    assert candidates.values is logits and candidates.dense
    assert torch.equal(logits, random_logits(7, rows, vocab))


# -- logit_bias ---------------------------------------------------------------------------------
def test_logit_bias_adds_to_the_named_tokens_only():
    out, _, _ = run(LogitBias, t([1.0, 2.0, 3.0, 4.0, -INF]),
                    bias=[{0: 1.5, 3: -100, 4: 50}])
    assert torch.equal(out[0], t([2.5, 2.0, 3.0, -96.0, -INF]))


def test_logit_bias_accepts_json_string_keys_and_changes_the_argmax():
    out, _, candidates = run(LogitBias, t([0.0, 0.0, 0.0]), bias=[{"2": 0.5}])
    assert torch.equal(out[0], t([0.0, 0.0, 0.5]))
    assert candidates.argmax().tolist() == [2]


def test_logit_bias_mixed_batch_equals_rows_alone():
    logits = random_logits(1)
    biases = [{1: 2.0, 5: -3.0}, {}, {63: 100.0}, {0: -0.25}]
    batch, _, _ = run(LogitBias, logits, bias=biases)
    assert torch.equal(batch[1], logits[1])
    for row, bias in enumerate(biases):
        alone, _, _ = run(LogitBias, logits[row], bias=[bias])
        assert torch.equal(batch[row], alone[0])


def test_logit_bias_off_everywhere_returns_untouched():
    assert_off(LogitBias, bias=[{}, {}, {}])


def test_logit_bias_sparse_equals_dense():
    logits = random_logits(2)
    best = torch.topk(logits, 5).indices
    biases = [{int(best[r, 0]): -4.0, int(best[r, 4]): 7.0, 60: 100.0} for r in range(4)]
    states = [make_state() for _ in range(4)]
    sparse, dense = sparse_and_dense(LogitBias, logits, states, 5, bias=biases)
    assert torch.equal(sparse, dense)
    assert all(len(kept(row)) == 5 for row in sparse)  # a bias never revives a masked token


def test_logit_bias_validation_names_the_field():
    with pytest.raises(InvalidArgument) as err:
        resolve_flat({"logit_bias": {5: 100.5}})
    assert "logit_bias" in err.value.field
    with pytest.raises(InvalidArgument) as err:
        resolve_flat({"logit_bias": {-1: 1.0}})
    assert "logit_bias" in err.value.field


def test_logit_bias_outside_the_vocabulary_is_an_invalid_argument():
    with pytest.raises(InvalidArgument) as err:
        run(LogitBias, t([1.0, 2.0]), bias=[{2: 1.0}])
    assert err.value.field == "logits.shape" and "logit_bias" in err.value.message


# -- allowed_token_ids --------------------------------------------------------------------------
def test_allowed_token_ids_masks_every_other_token():
    out, _, _ = run(AllowedTokenIds, t([5.0, 1.0, 3.0, -2.0, 4.0]), ids=[[1, 3, 3]])
    assert torch.equal(out[0], t([-INF, 1.0, -INF, -2.0, -INF]))


def test_allowed_token_ids_all_equal_and_minus_inf_entries():
    out, _, _ = run(AllowedTokenIds, torch.zeros(6), ids=[[0, 5]])
    assert kept(out[0]) == {0, 5} and float(out[0, 0]) == 0.0
    out, _, _ = run(AllowedTokenIds, t([-INF, 2.0, -INF]), ids=[[0, 1]])
    assert torch.equal(out[0], t([-INF, 2.0, -INF]))  # an allowed −inf stays −inf


def test_allowed_token_ids_single_candidate():
    out, _, candidates = run(AllowedTokenIds, t([3.0, 1.0, 2.0]), ids=[[1]])
    assert kept(out[0]) == {1} and candidates.argmax().tolist() == [1]


def test_allowed_token_ids_mixed_batch_equals_rows_alone():
    logits = random_logits(3)
    allowed = [[1, 2, 3], [], [63], list(range(0, 64, 2))]
    batch, _, _ = run(AllowedTokenIds, logits, ids=allowed)
    assert torch.equal(batch[1], logits[1])
    for row, ids in enumerate(allowed):
        alone, _, _ = run(AllowedTokenIds, logits[row], ids=[ids])
        assert torch.equal(batch[row], alone[0])
        if ids:
            assert kept(alone[0]) == set(ids)


def test_allowed_token_ids_sparse_equals_dense():
    logits = random_logits(4)
    best = torch.topk(logits, 6).indices
    # Each row allows two of its top 6 and one token outside them.
    worst = torch.topk(logits, 1, largest=False).indices
    allowed = [[int(best[r, 1]), int(best[r, 5]), int(worst[r, 0])] for r in range(4)]
    sparse, dense = sparse_and_dense(AllowedTokenIds, logits, [make_state() for _ in range(4)],
                                     6, ids=allowed)
    assert torch.equal(sparse, dense)
    for row in range(4):
        assert kept(sparse[row]) == {int(best[row, 1]), int(best[row, 5])}


def test_allowed_token_ids_sparse_keeps_best_first_order_for_later_stages():
    logits = random_logits(5, rows=2)
    best = torch.topk(logits, 4).indices
    allowed = [[int(best[0, 2]), int(best[0, 3])], [int(best[1, 1])]]
    _, _, candidates = run(AllowedTokenIds, logits, k=[4, 4], ids=allowed)
    assert candidates.max_values().tolist() == [float(logits[0, best[0, 2]]),
                                                float(logits[1, best[1, 1]])]
    assert candidates.argmax().tolist() == [int(best[0, 2]), int(best[1, 1])]


def test_allowed_token_ids_off_everywhere_returns_untouched():
    assert_off(AllowedTokenIds, ids=[[], [], []])


# -- bad_words ----------------------------------------------------------------------------------
def test_bad_words_single_token_is_always_banned():
    out, _, _ = run(BadWords, t([1.0, 2.0, 3.0, 4.0]), [make_state()], sequences=[[[2], [3]]])
    assert torch.equal(out[0], t([1.0, 2.0, -INF, -INF]))


def test_bad_words_multi_token_banned_only_after_its_prefix():
    words = [[[5, 6, 7]]]
    logits = torch.zeros(8)
    after, _, _ = run(BadWords, logits, [make_state((1, 5), [6], eos=(0,))], sequences=words)
    assert kept(after[0]) == set(range(8)) - {7}
    # The prefix may reach into the prompt (HF's input_ids include it).
    across, _, _ = run(BadWords, logits, [make_state((5, 6), [], eos=(0,))], sequences=words)
    assert kept(across[0]) == set(range(8)) - {7}
    # Not the end of the history, or a history shorter than the prefix: nothing is banned.
    for prompt, output in [((5, 6), [1]), ((), [6]), ((6,), [])]:
        out, _, _ = run(BadWords, logits, [make_state(prompt, output)], sequences=words)
        assert torch.equal(out[0], logits), (prompt, output)


def test_bad_words_single_eos_is_not_banned_as_in_hugging_face():
    logits = t([1.0, 2.0, 3.0, 4.0])
    out, _, _ = run(BadWords, logits, [make_state((1,), [2], eos=(3,))],
                    sequences=[[[3], [1], [2, 3]]])
    # [3] is an EOS id alone: kept. [2, 3] ends in EOS but is longer: applies after 2.
    assert torch.equal(out[0], t([1.0, -INF, 3.0, -INF]))
    out, _, _ = run(BadWords, logits, [make_state((1,), [1], eos=(3,))],
                    sequences=[[[3], [1], [2, 3]]])
    assert torch.equal(out[0], t([1.0, -INF, 3.0, 4.0]))


def test_bad_words_mixed_batch_equals_rows_alone():
    logits = random_logits(6)
    states = [make_state((9, 1), [2], eos=(0,)), make_state((1,), [2, 3]),
              make_state((), [], eos=(4,)), make_state((2, 2), [2])]
    words = [[[1, 2, 8], [9]], [], [[4], [5]], [[2, 2, 2, 7], [2, 2, 6]]]
    batch, _, _ = run(BadWords, logits, states, sequences=words)
    assert torch.equal(batch[1], logits[1])
    for row in range(4):
        alone, _, _ = run(BadWords, logits[row], [states[row]], sequences=[words[row]])
        assert torch.equal(batch[row], alone[0])
    assert set(range(64)) - kept(batch[0]) == {8, 9}
    assert set(range(64)) - kept(batch[2]) == {5}
    assert set(range(64)) - kept(batch[3]) == {6, 7}


def test_bad_words_sparse_equals_dense():
    logits = random_logits(8)
    best = torch.topk(logits, 5).indices.tolist()
    states = [make_state((3, 4), [r], eos=(0,)) for r in range(4)]
    words = [[[r, best[r][0]], [best[r][3]], [60, 61]] for r in range(4)]
    sparse, dense = sparse_and_dense(BadWords, logits, states, 5, sequences=words)
    assert torch.equal(sparse, dense)
    for r in range(4):
        assert kept(sparse[r]) == set(best[r]) - {best[r][0], best[r][3]}


def test_bad_words_off_everywhere_returns_untouched():
    assert_off(BadWords, sequences=[[], [], []])


def test_bad_words_validation_and_vocabulary():
    with pytest.raises(InvalidArgument) as err:
        resolve_flat({"bad_words": [[1], []]})
    assert "bad_words" in err.value.field
    with pytest.raises(InvalidArgument) as err:
        run(BadWords, t([0.0, 1.0]), sequences=[[[0, 5]]])
    assert err.value.field == "logits.shape"


# -- no_repeat_ngram ----------------------------------------------------------------------------
@pytest.mark.parametrize("size, banned", [(1, {1, 2, 3}), (2, {3}), (3, {3}), (4, set()),
                                          (5, set()), (6, set())])
def test_no_repeat_ngram_hand_computed(size, banned):
    # History 1 2 3 1 2 (prompt 1 2 3, output 1 2): the last n−1 ids recur before a 3.
    logits = torch.zeros(6)
    out, _, _ = run(NoRepeatNGram, logits, [make_state((1, 2, 3), [1, 2])], size=[size])
    assert set(range(6)) - kept(out[0]) == banned


def test_no_repeat_ngram_uses_the_prompt():
    out, _, _ = run(NoRepeatNGram, torch.zeros(5), [make_state((4, 1, 4), [])], size=[2])
    assert set(range(5)) - kept(out[0]) == {1}


def test_no_repeat_ngram_mixed_batch_equals_rows_alone_and_off_rows_untouched():
    logits = random_logits(9)
    states = [make_state((1, 2, 1), [2]), make_state((1, 2, 1), [2]),
              make_state((3,), [3, 3]), make_state((), [5])]
    sizes = [2, 0, 1, 3]
    batch, _, _ = run(NoRepeatNGram, logits, states, size=sizes)
    assert torch.equal(batch[1], logits[1])
    for row in range(4):
        alone, _, _ = run(NoRepeatNGram, logits[row], [make_state(states[row].prompt_ids,
                                                                  states[row].output_ids)],
                          size=[sizes[row]])
        assert torch.equal(batch[row], alone[0])
    assert set(range(64)) - kept(batch[0]) == {1}
    assert set(range(64)) - kept(batch[2]) == {3}


def test_no_repeat_ngram_off_everywhere_returns_untouched():
    assert_off(NoRepeatNGram, size=[0, 0, 0])


def test_no_repeat_ngram_sparse_equals_dense():
    logits = random_logits(10)
    best = torch.topk(logits, 4).indices.tolist()
    # Each row's history makes its best token (and one outside the top 4) a repeat.
    states = [make_state((7, best[r][0], 7, 60), [7]) for r in range(4)]
    sparse, dense = sparse_and_dense(NoRepeatNGram, logits, states, 4, size=[2] * 4)
    assert torch.equal(sparse, dense)
    for r in range(4):
        assert kept(sparse[r]) == set(best[r]) - {best[r][0]}


def _accept(state: SequenceState, batch: RowBatch, row: int, token: int) -> None:
    """What the service does when a step is accepted."""
    state.processor_state.update(batch.pending_for(row))
    state.accept(token, 0.0, 0.0)


def test_no_repeat_ngram_index_is_incremental_and_survives_retries():
    state = make_state((1, 2, 3), [], sid="a")
    vocab = 8
    rng = random.Random(0)
    previous = None
    for step in range(30):
        logits = torch.randn(vocab, generator=torch.Generator().manual_seed(step))
        # A retry (same step, nothing accepted) and a fresh sequence agree with the real one.
        first, _, _ = run(NoRepeatNGram, logits, [state], size=[3])
        again, batch, _ = run(NoRepeatNGram, logits, [state], size=[3])
        fresh, _, _ = run(NoRepeatNGram, logits, [make_state(state.prompt_ids, state.output_ids)],
                          size=[3])
        assert torch.equal(first, again) and torch.equal(first, fresh)
        index = batch.pending["no_repeat_ngram"][0]
        assert index.length == 3 + step
        if previous is not None:
            assert index.table is previous.table  # extended in place, not rebuilt
        previous = index
        allowed = sorted(kept(first[0]))
        _accept(state, batch, 0, rng.choice(allowed))
    history = list(state.prompt_ids) + state.output_ids
    trigrams = list(zip(history, history[1:], history[2:]))
    assert len(trigrams) == len(set(trigrams))


def test_no_repeat_ngram_index_copied_into_another_sequence_is_rebuilt():
    parent = make_state((1, 2), [3, 1], sid="parent")
    _, batch, _ = run(NoRepeatNGram, torch.zeros(6), [parent], size=[2])
    _accept(parent, batch, 0, 4)
    _, batch, _ = run(NoRepeatNGram, torch.zeros(6), [parent], size=[2])
    parent.processor_state.update(batch.pending_for(0))  # its index: 1 2 3 1 4, with (1, 4)
    assert parent.processor_state["no_repeat_ngram"].table[(1,)] == {2, 4}
    # A child of the same length carrying the parent's state (e.g. a fork copying it).
    child = make_state((1, 2), [3, 5, 1], sid="child")
    child.processor_state = dict(parent.processor_state)
    out, _, _ = run(NoRepeatNGram, torch.zeros(6), [child], size=[2])
    assert set(range(6)) - kept(out[0]) == {2}  # only (1, 2) of its own history
    # A stale index longer than the history (same id) is rebuilt too.
    shorter = make_state((1, 2), [3], sid="parent")
    shorter.processor_state = dict(parent.processor_state)
    out, _, _ = run(NoRepeatNGram, torch.zeros(6), [shorter], size=[2])
    assert set(range(6)) - kept(out[0]) == set()


def test_no_repeat_ngram_through_the_engine_never_repeats_a_bigram():
    policy = resolve(parse_policy("nr", {"chain": [{"no_repeat_ngram": {"size": 2}}],
                                         "select": "greedy"}), PolicyVersion(1, "x"), {})
    state = SequenceState("g", policy, (0, 1), 0, frozenset({99}))
    engine = Engine(CPU)
    logits = torch.zeros(1, 12)
    logits[0, 1] = 5.0  # the model loves token 1, then token 2
    logits[0, 2] = 4.0
    for _ in range(11):
        outcome = engine.step([state], logits)[0]
        retry = engine.step([state], logits)[0]  # computed again, never accepted
        assert retry.token_id == outcome.token_id
        state.processor_state.update(outcome.memory)
        state.accept(outcome.token_id, outcome.entropy, outcome.varentropy)
    history = list(state.prompt_ids) + state.output_ids
    bigrams = list(zip(history, history[1:]))
    assert len(bigrams) == len(set(bigrams))
    assert state.output_ids[:3] == [1, 2, 1]  # 0 1 | 1 2 1: (1, 1) ok, then (1, 2) is taken


# -- exponential_decay_length_penalty -----------------------------------------------------------
def test_exponential_decay_hand_computed():
    # start 2, factor 2, position 4: growth 2^2 − 1 = 3; |l| · 3 is added to each EOS logit.
    logits = t([1.0, -2.0, 0.5, -INF])
    state = make_state((9,), [5, 5, 5, 5], eos=(0, 1, 3))
    out, _, _ = run(ExponentialDecayLengthPenalty, logits, [state], start=[2], factor=[2.0])
    assert torch.equal(out[0], t([4.0, 4.0, 0.5, -INF]))


@pytest.mark.parametrize("generated", [0, 1, 2])
def test_exponential_decay_waits_until_after_start(generated):
    logits = t([1.0, -2.0, 0.5])
    state = make_state((), [4] * generated, eos=(0,))
    out, _, _ = run(ExponentialDecayLengthPenalty, logits, [state], start=[2], factor=[2.0])
    assert torch.equal(out[0], logits)


def test_exponential_decay_factor_below_one_lowers_eos():
    state = make_state((), [4, 4], eos=(0, 1))
    out, _, _ = run(ExponentialDecayLengthPenalty, t([2.0, -2.0, 0.0]), [state], start=[0],
                    factor=[0.5])
    # growth 0.5² − 1 = −0.75: 2 − 1.5 = 0.5 and −2 − 1.5 = −3.5.
    assert torch.equal(out[0], t([0.5, -3.5, 0.0]))


def test_exponential_decay_saturates_instead_of_overflowing():
    state = make_state((), [4] * 300, eos=(0,))
    out, _, _ = run(ExponentialDecayLengthPenalty, t([1.0, 3.0]), [state], start=[0],
                    factor=[2.0])
    assert float(out[0, 0]) == torch.finfo(torch.float32).max
    assert torch.isfinite(torch.log_softmax(out[0], dim=0)).all()
    # |0| · inf would be NaN: a zero EOS logit stays 0, a small one grows but stays finite.
    out, _, _ = run(ExponentialDecayLengthPenalty, t([0.0, 1e-30, 3.0]),
                    [make_state((), [4] * 300, eos=(0, 1))], start=[0], factor=[2.0])
    assert float(out[0, 0]) == 0.0 and float(out[0, 1]) > 1e8
    assert torch.isfinite(out).all()


def test_exponential_decay_mixed_batch_equals_rows_alone():
    logits = random_logits(11)
    states = [make_state((1,), [2] * n, eos=(0, 5)) for n in (3, 3, 6, 1)]
    starts, factors = [1, 1, 2, 0], [1.5, 1.0, 0.75, 3.0]
    batch, _, _ = run(ExponentialDecayLengthPenalty, logits, states, start=starts, factor=factors)
    assert torch.equal(batch[1], logits[1])
    for row in range(4):
        alone, _, _ = run(ExponentialDecayLengthPenalty, logits[row], [states[row]],
                          start=[starts[row]], factor=[factors[row]])
        assert torch.equal(batch[row], alone[0])
        changed = set(torch.nonzero(batch[row] != logits[row]).flatten().tolist())
        assert changed == ({0, 5} if row != 1 else set())


def test_exponential_decay_sparse_equals_dense():
    logits = random_logits(12)
    best = torch.topk(logits, 5).indices.tolist()
    states = [make_state((), [1] * 4, eos=(best[r][2], best[r][4], 63)) for r in range(4)]
    sparse, dense = sparse_and_dense(ExponentialDecayLengthPenalty, logits, states, 5,
                                     start=[1] * 4, factor=[1.25] * 4)
    assert torch.equal(sparse, dense)


def test_exponential_decay_off_and_validation():
    assert_off(ExponentialDecayLengthPenalty, start=[0, 0, 0], factor=[1.0, 1.0, 1.0])
    policy = {"chain": [{"exponential_decay_length_penalty": {"factor": 0.0}}],
              "select": "sample"}
    with pytest.raises(InvalidArgument) as err:
        parse_policy("bad", policy)
    assert err.value.field.endswith("exponential_decay_length_penalty.factor")


# -- suppress_tokens ----------------------------------------------------------------------------
@pytest.mark.parametrize("generated, suppressed", [(0, True), (1, False), (2, True), (3, False)])
def test_suppress_tokens_at_the_listed_steps(generated, suppressed):
    logits = t([1.0, 2.0, 3.0, -INF])
    state = make_state((5,), [0] * generated)
    out, _, _ = run(SuppressTokens, logits, [state], ids=[[1, 3]], steps=[[0, 2]])
    assert torch.equal(out[0], t([1.0, -INF, 3.0, -INF]) if suppressed else logits)


def test_suppress_tokens_default_step_is_the_first():
    out, _, _ = run(SuppressTokens, t([1.0, 2.0]), [make_state((5,))], ids=[[0]])
    assert torch.equal(out[0], t([-INF, 2.0]))
    out, _, _ = run(SuppressTokens, t([1.0, 2.0]), [make_state((5,), [1])], ids=[[0]])
    assert torch.equal(out[0], t([1.0, 2.0]))


def test_suppress_tokens_mixed_batch_and_sparse_equals_dense():
    logits = random_logits(13)
    best = torch.topk(logits, 5).indices.tolist()
    states = [make_state((), [1] * r) for r in range(4)]
    ids = [[best[r][0], best[r][3], 62] for r in range(4)]
    steps = [[0], [1, 5], [0, 1], [3]]
    sparse, dense = sparse_and_dense(SuppressTokens, logits, states, 5, ids=ids, steps=steps)
    assert torch.equal(sparse, dense)
    for r, on in enumerate([True, True, False, True]):
        assert kept(sparse[r]) == (set(best[r]) - {best[r][0], best[r][3]} if on else set(best[r]))
    batch, _, _ = run(SuppressTokens, logits, states, ids=ids, steps=steps)
    for row in range(4):
        alone, _, _ = run(SuppressTokens, logits[row], [states[row]], ids=[ids[row]],
                          steps=[steps[row]])
        assert torch.equal(batch[row], alone[0])
    assert torch.equal(batch[2], logits[2])


def test_suppress_tokens_off_everywhere_returns_untouched():
    assert_off(SuppressTokens, ids=[[], [], []])
    assert_off(SuppressTokens, ids=[[1], [2], [3]], steps=[[], [], []])


# -- forced_tokens ------------------------------------------------------------------------------
def test_forced_tokens_point_mass_at_the_given_step():
    logits = t([1.0, 2.0, 3.0, -INF])
    forced = [{1: 0, "3": 3}]
    for generated, expected in [(0, logits), (1, t([0.0, -INF, -INF, -INF])), (2, logits),
                                (3, t([-INF, -INF, -INF, 0.0]))]:
        out, _, candidates = run(ForcedTokens, logits, [make_state((7,), [2] * generated)],
                                 tokens=forced)
        assert torch.equal(out[0], expected), generated
    assert candidates.argmax().tolist() == [3]  # the −inf token is forced all the same


def test_forced_tokens_mixed_batch_equals_rows_alone():
    logits = random_logits(14)
    states = [make_state((), [1] * n) for n in (0, 2, 2, 5)]
    forced = [{0: 9}, {}, {1: 4, 2: 63}, {5: 0}]
    batch, _, _ = run(ForcedTokens, logits, states, tokens=forced)
    assert torch.equal(batch[1], logits[1])
    for row in range(4):
        alone, _, _ = run(ForcedTokens, logits[row], [states[row]], tokens=[forced[row]])
        assert torch.equal(batch[row], alone[0])
    assert [kept(batch[r]) for r in (0, 2, 3)] == [{9}, {63}, {0}]


def test_forced_tokens_sparse_equals_dense_when_the_token_is_or_is_not_kept():
    logits = random_logits(15)
    best = torch.topk(logits, 3).indices.tolist()
    worst = torch.topk(logits, 1, largest=False).indices.flatten().tolist()
    states = [make_state((), [1]) for _ in range(4)]
    # Rows 0 and 2 force a token top_k kept, rows 1 and 3 one it dropped.
    forced = [{1: best[0][2]}, {1: worst[1]}, {1: best[2][0]}, {0: 5}]
    sparse, dense = sparse_and_dense(ForcedTokens, logits, states, 3, tokens=forced)
    assert torch.equal(sparse, dense)
    assert [kept(sparse[r]) for r in range(3)] == [{best[0][2]}, {worst[1]}, {best[2][0]}]
    assert kept(sparse[3]) == set(best[3])
    _, _, candidates = run(ForcedTokens, logits, states, k=[3] * 4, tokens=forced)
    assert candidates.argmax().tolist()[:3] == [best[0][2], worst[1], best[2][0]]
    log_p = candidates.log_softmax()
    assert log_p.at(torch.tensor([best[0][2], worst[1], best[2][0], 0])).tolist()[:3] == [0.0] * 3


def test_forced_tokens_off_everywhere_and_vocabulary():
    assert_off(ForcedTokens, tokens=[{}, {}, {}])
    assert_off(ForcedTokens, tokens=[{0: 1}, {1: 1}, {5: 1}])  # positions 2: not forced now
    with pytest.raises(InvalidArgument) as err:
        run(ForcedTokens, t([0.0, 1.0]), tokens=[{0: 2}])
    assert err.value.field == "logits.shape"


# -- chains, flat parameters and shipped policies -----------------------------------------------
def test_canonical_order_is_vllm_v1s():
    assert [cls.key for cls in CANONICAL_ORDER] == [
        "structured", "allowed_token_ids", "bad_words", "min_tokens", "logit_bias",
        "repetition_penalty", "frequency_penalty", "presence_penalty", "temperature", "min_p",
        "top_k", "top_p"]
    for key in ("no_repeat_ngram", "exponential_decay_length_penalty", "suppress_tokens",
                "forced_tokens"):
        assert key in PROCESSORS


@pytest.mark.parametrize("name", ["default", "greedy"])
def test_shipped_policies_let_requests_set_the_flat_constraints(name):
    spec = shipped_policies()[name]
    keys = [key for key, _ in spec.chain]
    assert keys[:4] == ["allowed_token_ids", "bad_words", "min_tokens", "logit_bias"]
    assert {"allowed_token_ids", "bad_words", "logit_bias"} <= spec.overridable
    resolved = resolve(spec, PolicyVersion(1, "x"), {"logit_bias": {"3": 1.0},
                                                     "allowed_token_ids": [3, 4],
                                                     "bad_words": [[4]]})
    values = {link.stage.key: dict(link.values) for link in resolved.links}
    assert values["logit_bias"] == {"bias": ((3, 1.0),)}
    assert values["allowed_token_ids"] == {"ids": (3, 4)}
    assert values["bad_words"] == {"sequences": ((4,),)}


def test_flat_parameters_reach_the_engine():
    policy = resolve_flat({"allowed_token_ids": [2, 5, 7], "bad_words": [[1, 7]],
                           "logit_bias": {5: 0.5}, "temperature": 0.0})
    state = SequenceState("f", policy, (1,), 0, frozenset({0}))
    logits = torch.zeros(1, 10)
    logits[0, 7] = 2.0  # banned after 1
    logits[0, 9] = 9.0  # not allowed
    logits[0, 2] = 0.25
    outcome = Engine(CPU).step([state], logits)[0]
    assert outcome.token_id == 5  # 0 + 0.5 beats 0.25


def test_flat_off_values_leave_the_flat_chain_unchanged():
    logits = random_logits(16, rows=1, vocab=50)
    engine = Engine(CPU)
    plain = engine.distribution(SequenceState("a", resolve_flat({}), (1, 2), 0, frozenset()),
                                logits[0])
    off = engine.distribution(SequenceState("b", resolve_flat({"logit_bias": {},
                                                                "allowed_token_ids": [],
                                                                "bad_words": []}),
                                            (1, 2), 0, frozenset()), logits[0])
    assert torch.equal(plain, off)


# -- against Hugging Face -----------------------------------------------------------------------
SEEDS = [0, 1, 2]
HF_VOCAB = 50


def hf_batch(seed: int, rows: int = 6, length: int = 24, alphabet: int = 6):
    """Random input ids (a small alphabet, so n-grams and bad-word prefixes recur), split into
    prompt + output at a different point per row, and random logits."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, alphabet, (rows, length), generator=g)
    logits = torch.randn(rows, HF_VOCAB, generator=g) * 3
    splits = torch.randint(0, length + 1, (rows,), generator=g).tolist()
    return input_ids, logits, splits


def states_for(input_ids, splits, eos=()):
    return [make_state(tuple(ids[:s]), ids[s:], eos=eos, sid=f"r{r}")
            for r, (ids, s) in enumerate(zip(input_ids.tolist(), splits))]


def assert_same(ours: torch.Tensor, theirs: torch.Tensor):
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    finite = torch.isfinite(theirs)
    assert torch.allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_bad_words_matches_hugging_face(seed, transformers):
    input_ids, logits, splits = hf_batch(seed)
    last = input_ids[:, -3:].tolist()
    # Planted: some rows end with a word's prefix; one word's prefix spans the whole history.
    words = [[7], [2, 11], last[0] + [12], last[1][1:] + [13], [last[2][2], 14], [3],
             input_ids[3].tolist() + [15], [8, 8, 16], [0]]
    processor = transformers.NoBadWordsLogitsProcessor(words, eos_token_id=[0, 8])
    theirs = processor(input_ids, logits.clone())
    states = states_for(input_ids, splits, eos=(0, 8))
    ours, _, _ = run(BadWords, logits, states, sequences=[words] * len(states))
    assert_same(ours, theirs)
    assert not torch.isfinite(ours[0, 12]) and not torch.isfinite(ours[3, 15])
    assert torch.isfinite(ours[:, 0]).all()  # a single EOS is not banned
    # The same on a sparse batch.
    sparse, dense = sparse_and_dense(BadWords, logits, states_for(input_ids, splits, eos=(0, 8)),
                                     20, sequences=[words] * len(states))
    assert torch.equal(sparse, dense)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_hugging_face(seed, size, transformers):
    input_ids, logits, splits = hf_batch(seed)
    theirs = transformers.NoRepeatNGramLogitsProcessor(size)(input_ids, logits.clone())
    ours, _, _ = run(NoRepeatNGram, logits, states_for(input_ids, splits), size=[size] * 6)
    assert_same(ours, theirs)
    assert not torch.isfinite(theirs).all()  # something was banned


@pytest.mark.parametrize("seed", SEEDS)
def test_no_repeat_ngram_step_by_step_matches_hugging_face(seed, transformers):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 5, (6,), generator=g).tolist()
    state = make_state(prompt, [], sid="hf")
    processor = transformers.NoRepeatNGramLogitsProcessor(2)
    for _ in range(12):
        logits = torch.randn(1, HF_VOCAB, generator=g)
        logits[0, :5] += 6.0  # the small alphabet is likely: repeats are tempting
        input_ids = torch.tensor([list(state.prompt_ids) + state.output_ids])
        theirs = processor(input_ids, logits.clone())
        ours, batch, candidates = run(NoRepeatNGram, logits, [state], size=[2])
        assert_same(ours, theirs)
        _accept(state, batch, 0, int(candidates.argmax()))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("start, factor", [(0, 1.5), (3, 1.25), (5, 0.75), (2, 2.0)])
def test_exponential_decay_matches_hugging_face(seed, start, factor, transformers):
    g = torch.Generator().manual_seed(seed)
    prompt_length, eos = 5, [0, 3]
    logits = torch.randn(4, HF_VOCAB, generator=g) * 3
    logits[0, 0], logits[1, 3], logits[2, 0] = -2.5, 4.0, -INF  # negative, positive, masked
    for generated in range(0, 9):
        input_ids = torch.randint(0, HF_VOCAB, (4, prompt_length + generated), generator=g)
        processor = transformers.ExponentialDecayLengthPenalty((start, factor), eos, prompt_length)
        theirs = processor(input_ids, logits.clone())
        states = states_for(input_ids, [prompt_length] * 4, eos=eos)
        ours, _, _ = run(ExponentialDecayLengthPenalty, logits, states, start=[start] * 4,
                         factor=[factor] * 4)
        assert torch.equal(ours, theirs), generated
        assert torch.equal(ours, logits) == (generated <= start)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("generated", [0, 1, 3])
def test_suppress_tokens_matches_hugging_face(seed, generated, transformers):
    g = torch.Generator().manual_seed(seed)
    prompt_length, ids = 4, [1, 7, 49]
    input_ids = torch.randint(0, HF_VOCAB, (3, prompt_length + generated), generator=g)
    logits = torch.randn(3, HF_VOCAB, generator=g)
    processor = transformers.SuppressTokensAtBeginLogitsProcessor(ids, prompt_length)
    theirs = processor(input_ids, logits.clone())
    ours, _, _ = run(SuppressTokens, logits, states_for(input_ids, [prompt_length] * 3),
                     ids=[ids] * 3)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, logits) == (generated != 0)
