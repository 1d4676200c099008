"""llama.cpp's `penalties` (repeat / frequency / presence over a window) and `dry` processors.

Hand-computed rows first, then against literal Python ports of llama.cpp's
`llama_sampler_penalties_apply` / `llama_sampler_dry_apply` (ring buffer, Z-algorithm, restart
sequences) on random histories, against Hugging Face's `RepetitionPenaltyLogitsProcessor`, and
the batch / sparse / spec checks every processor gets.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sampler_service.engine import Engine
from sampler_service.errors import InvalidArgument
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.processors import PROCESSORS, RowBatch, TopK
from sampler_service.policy.processors.penalties import Dry, Penalties
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.spec import parse_policy, resolve, resolve_flat
from sampler_service.state import SequenceState

CPU = torch.device("cpu")
INF = math.inf
_DTYPES = {"float": torch.float32, "int": torch.int64}
PEN = torch.tensor([2.0, -1.0, 0.5, -3.0, 4.0, 1.0, 0.0])


def make_state(prompt=(), output=()) -> SequenceState:
    return SequenceState(sequence_id="s", policy=resolve_flat({}), prompt_ids=tuple(prompt),
                         seed=0, eos_token_ids=frozenset(), output_ids=list(output))


def tensors(cls, args: dict) -> dict:
    """Scalar parameters as the engine's [rows] tensors; other kinds as per-row lists."""
    kinds = {p.name: p.kind for p in cls.params}
    return {name: torch.tensor(values, dtype=_DTYPES[kinds[name]]) if kinds[name] in _DTYPES
            else list(values) for name, values in args.items()}


def run(cls, logits, states, candidates=None, **args) -> tuple[torch.Tensor, Candidates]:
    """Applies `cls` to `logits` ([V] or [R, V]) with one value per row for each parameter (a
    parameter not given takes its default). Returns (dense processed logits, candidates)."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    rows = logits.shape[0]
    full = {p.name: args.get(p.name, [p.default] * rows) for p in cls.params}
    candidates = candidates if candidates is not None else Candidates(logits.clone())
    cls().apply(candidates, tensors(cls, full), RowBatch(states, CPU))
    return candidates.to_dense(), candidates


def dry(logits, history, prompt=(), **args):
    """DRY on one row whose sequence is prompt + history (the output); `args` hold one value
    per row, as `run` takes them."""
    return run(Dry, logits, [make_state(prompt, history)], **args)[0][0]


# -- literal ports of llama.cpp (src/llama-sampling.cpp) ----------------------------------------
def llama_penalties(logits: np.ndarray, accepted: list[int], last_n: int, repeat: float,
                    freq: float, present: float) -> np.ndarray:
    """`llama_sampler_penalties_accept` over every accepted token, then `_apply`, in float32.
    last_n = -1 is what the server turns into the context size: here, every token."""
    last_n = len(accepted) if last_n == -1 else last_n
    out = logits.astype(np.float32).copy()
    repeat, freq, present = np.float32(repeat), np.float32(freq), np.float32(present)
    if last_n == 0 or (repeat == 1 and freq == 0 and present == 0):
        return out
    prev: list[int] = []
    counts: dict[int, int] = {}
    for token in accepted:
        counts[token] = counts.get(token, 0) + 1
        if len(prev) >= last_n:
            old = prev.pop(0)
            counts[old] -= 1
            if counts[old] == 0:
                del counts[old]
        prev.append(token)
    for token, count in counts.items():
        logit = out[token]
        logit = logit * repeat if logit <= 0 else logit / repeat
        out[token] = logit - (np.float32(count) * freq + np.float32(count > 0) * present)
    return out


def llama_dry(logits: np.ndarray, accepted: list[int], multiplier: float, base: float,
              allowed: int, last_n: int, breakers: list[list[int]]) -> np.ndarray:
    """`llama_sampler_dry_apply` after accepting every token, with token-id breakers as
    `llama_sampler_init_dry_testing` takes them; context size = every token."""
    out = logits.astype(np.float32).copy()
    multiplier, base = np.float32(multiplier), np.float32(base)
    if multiplier == 0 or base < 1 or last_n == 0:
        return out
    total = len(accepted)
    effective = total if last_n == -1 else max(last_n, 0)
    last_tokens = accepted[len(accepted) - min(effective, len(accepted)):]  # the ring buffer

    def rat(i):
        return last_tokens[len(last_tokens) - 1 - i]

    table = [(b[0], list(b[1:])) for b in breakers]
    n = min(len(last_tokens), effective, total)
    if n <= allowed:
        return out
    repeat_count = [0] * n
    max_token_repeat: dict[int, int] = {}
    rep_limit = n
    for i in range(n):
        token = rat(i)
        tails = [tail for head, tail in table if head == token]
        if not tails:
            continue
        longest = -1
        for tail in tails:
            seq_len = len(tail)
            if longest < seq_len <= i:
                if all(tail[o] == rat(i - o - 1) for o in range(seq_len)):
                    longest = seq_len
        if longest >= 0:
            rep_limit = i - longest
            break
    if rep_limit < allowed:
        return out
    last, rt, lt = n - 1, 0, 0
    for k in range(1, n):
        if k > rt:
            m = 0
            while m + k < n and rat(m) == rat(m + k):
                m += 1
            repeat_count[last - k] = min(m, rep_limit)
            if m > 0:
                lt, rt = k, k + m - 1
        else:
            p = k - lt
            right_part_len = rt - k + 1
            if repeat_count[last - p] < right_part_len:
                repeat_count[last - k] = min(repeat_count[last - p], rep_limit)
            else:
                i = rt + 1
                while i < n and rat(i) == rat(i - k):
                    i += 1
                repeat_count[last - k] = min(i - k, rep_limit)
                lt, rt = k, i - 1
    for i in range(n - 1):
        repeat_len = repeat_count[i]
        if repeat_len >= allowed:
            token = rat(n - 2 - i)
            if token not in max_token_repeat or max_token_repeat[token] < repeat_len:
                max_token_repeat[token] = repeat_len
    max_exponent = 0
    if base > np.float32(1.000001):
        max_exponent = int(np.float32(88.7228391) / np.log(base))
    for token, repeat_len in max_token_repeat.items():
        if any(head == token and not tail for head, tail in table):
            continue
        exponent = repeat_len - allowed
        if max_exponent > 0 and exponent > max_exponent:
            exponent = max_exponent
        penalty = np.float32(float(multiplier) * math.pow(float(base), exponent))
        out[token] = out[token] - penalty
    return out


# -- penalties: hand-computed -------------------------------------------------------------------
def test_penalties_repeat_frequency_presence_over_whole_context():
    # prompt + output = 0 1 3 0 0: counts 0 x3, 1 x1, 3 x1.
    state = make_state(prompt=(0, 1), output=[3, 0, 0])
    out, _ = run(Penalties, PEN, [state], last_n=[-1], repeat=[2.0], frequency=[0.5],
                 presence=[0.25])
    # 0: 2/2 − (3·0.5 + 0.25) = −0.75; 1: −1·2 − 0.75 = −2.75; 3: −3·2 − 0.75 = −6.75.
    assert torch.equal(out[0], torch.tensor([-0.75, -2.75, 0.5, -6.75, 4.0, 1.0, 0.0]))


@pytest.mark.parametrize("last_n, expected", [
    (1, [1.5, -1.0, 0.5, -3.0, 4.0, 1.0, 0.0]),       # window [0]
    (2, [1.0, -1.0, 0.5, -3.0, 4.0, 1.0, 0.0]),       # [0 0]
    (3, [1.0, -1.0, 0.5, -3.5, 4.0, 1.0, 0.0]),       # [3 0 0]: the output
    (4, [1.0, -1.5, 0.5, -3.5, 4.0, 1.0, 0.0]),       # [1 3 0 0]: reaches into the prompt
    (5, [0.5, -1.5, 0.5, -3.5, 4.0, 1.0, 0.0]),       # everything
    (500, [0.5, -1.5, 0.5, -3.5, 4.0, 1.0, 0.0]),
    (-1, [0.5, -1.5, 0.5, -3.5, 4.0, 1.0, 0.0]),
])
def test_penalties_window_is_last_n_of_prompt_plus_output(last_n, expected):
    state = make_state(prompt=(0, 1), output=[3, 0, 0])
    out, _ = run(Penalties, PEN, [state], last_n=[last_n], frequency=[0.5])
    assert torch.equal(out[0], torch.tensor(expected))


def test_penalties_repeat_once_per_token_and_zero_logit():
    state = make_state(prompt=(6, 6, 6), output=[1, 1])
    out, _ = run(Penalties, PEN, [state], last_n=[-1], repeat=[3.0])
    expected = PEN.clone()
    expected[1] = -3.0  # −1·3, once for two occurrences
    assert torch.equal(out[0], expected)  # token 6 has logit 0: stays 0


def test_penalties_negative_frequency_presence_encourage():
    state = make_state(output=[4, 4])
    out, _ = run(Penalties, PEN, [state], last_n=[64], frequency=[-1.0], presence=[-0.5])
    assert out[0, 4].item() == 6.5
    assert torch.equal(out[0, :4], PEN[:4])


def test_penalties_leave_minus_inf_and_single_candidate():
    logits = torch.tensor([-INF, 1.0, -INF])
    state = make_state(prompt=(0, 1), output=[0])
    out, _ = run(Penalties, logits, [state], last_n=[-1], repeat=[2.0], frequency=[1.0],
                 presence=[1.0])
    assert out[0, 0].item() == -INF and out[0, 2].item() == -INF
    assert out[0, 1].item() == 0.5 - 2.0


def test_penalties_all_equal_logits():
    state = make_state(prompt=(1, 2, 2))
    out, _ = run(Penalties, torch.ones(4), [state], last_n=[-1], repeat=[2.0], presence=[0.5])
    assert torch.equal(out[0], torch.tensor([1.0, 0.0, 0.0, 1.0]))


@pytest.mark.parametrize("args", [
    dict(last_n=[0], repeat=[2.0], frequency=[1.0], presence=[1.0]),
    dict(last_n=[64], repeat=[1.0], frequency=[0.0], presence=[0.0]),
    dict(last_n=[-1]),  # defaults: repeat 1, frequency 0, presence 0
])
def test_penalties_off_values_bit_identical(args):
    logits = torch.randn(1, 7, generator=torch.Generator().manual_seed(0))
    state = make_state(prompt=(0, 1, 2), output=[3, 3, 4])
    out, _ = run(Penalties, logits, [state], **args)
    assert torch.equal(out, logits)


def test_penalties_empty_history_changes_nothing():
    out, _ = run(Penalties, PEN, [make_state()], last_n=[-1], repeat=[2.0], presence=[1.0])
    assert torch.equal(out[0], PEN)


# -- penalties: references ----------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_penalties_match_llama_cpp_port(seed):
    g = torch.Generator().manual_seed(seed)
    vocab = 50
    logits = torch.randn(6, vocab, generator=g) * 3
    settings = [(-1, 1.3, 0.2, 0.4), (0, 1.3, 0.2, 0.4), (5, 0.8, 0.0, 0.0), (17, 1.0, 0.7, 0.0),
                (64, 1.1, -0.3, 1.5), (3, 2.0, 1.0, -1.0)]
    states = []
    for _ in settings:
        prompt = torch.randint(0, vocab, (int(torch.randint(0, 30, (1,), generator=g)),),
                               generator=g).tolist()
        output = torch.randint(0, 12, (int(torch.randint(0, 30, (1,), generator=g)),),
                               generator=g).tolist()
        states.append(make_state(prompt, output))
    out = penalties_as_llama_cpp(logits, states, settings)
    assert torch.equal(out[1], logits[1])  # last_n = 0


def penalties_as_llama_cpp(logits: torch.Tensor, states, settings) -> torch.Tensor:
    """The `penalties` stage on rows [R, V] with (last_n, repeat, frequency, presence) per row,
    asserted equal to the llama.cpp port row by row; its output."""
    columns = list(zip(*settings))
    out, _ = run(Penalties, logits, states, last_n=list(columns[0]), repeat=list(columns[1]),
                 frequency=list(columns[2]), presence=list(columns[3]))
    for row, (state, setting) in enumerate(zip(states, settings)):
        theirs = llama_penalties(logits[row].numpy(), [*state.prompt_ids, *state.output_ids],
                                 *setting)
        assert torch.equal(out[row], torch.from_numpy(theirs))
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
@pytest.mark.parametrize("last_n", [-1, 50, 1000])
def test_penalties_repeat_only_matches_hugging_face(seed, penalty, last_n):
    """With frequency = presence = 0 and a window covering everything, `penalties` is HF's
    repetition penalty over prompt + output."""
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(300 + seed)
    logits = torch.randn(4, 1000, generator=g) * 3
    prompt = torch.randint(0, 1000, (4, 30), generator=g)
    output = torch.randint(0, 50, (4, 20), generator=g)
    states = [make_state(tuple(prompt[r].tolist()), output[r].tolist()) for r in range(4)]
    ours, _ = run(Penalties, logits, states, last_n=[last_n] * 4, repeat=[penalty] * 4)
    theirs = transformers.RepetitionPenaltyLogitsProcessor(penalty)(
        torch.cat([prompt, output], dim=1), logits.clone())
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours, logits)


def test_penalties_short_window_differs_from_hugging_face():
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(9)) + 5  # all positive
    state = make_state(prompt=(1, 2, 3), output=[4, 5])
    ours, _ = run(Penalties, logits, [state], last_n=[2], repeat=[2.0])
    changed = set(torch.nonzero(ours[0] != logits[0]).flatten().tolist())
    assert changed == {4, 5}


# -- DRY: hand-computed -------------------------------------------------------------------------
def test_dry_brief_example_penalises_the_continuation():
    # [1 2] at the end also occurs at 0-1, followed by 3: emitting 3 would repeat [1 2 3].
    out = dry(torch.zeros(6), [1, 2, 3, 1, 2], multiplier=[0.8], base=[1.75],
              allowed_length=[2])
    assert torch.equal(out, torch.tensor([0.0, 0.0, 0.0, -0.8, 0.0, 0.0]))


def test_dry_penalty_grows_with_base_per_extra_token():
    # [1 2 3] repeats, followed by 4 before: length 3, allowed 2: 0.8 · 1.75^1 = 1.4.
    out = dry(torch.zeros(6), [1, 2, 3, 4, 1, 2, 3], multiplier=[0.8], base=[1.75],
              allowed_length=[2])
    assert out[4].item() == pytest.approx(-1.4, abs=1e-6)
    assert torch.equal(out[[0, 1, 2, 3, 5]], torch.zeros(5))
    # allowed 1: 0.8 · 1.75²; allowed 4: nothing is long enough.
    out = dry(torch.zeros(6), [1, 2, 3, 4, 1, 2, 3], multiplier=[0.8], base=[1.75],
              allowed_length=[1])
    assert out[4].item() == pytest.approx(-0.8 * 1.75 ** 2, abs=1e-6)
    out = dry(torch.zeros(6), [1, 2, 3, 4, 1, 2, 3], multiplier=[0.8], base=[1.75],
              allowed_length=[4])
    assert torch.equal(out, torch.zeros(6))


def test_dry_llama_cpp_documented_example():
    """llama.cpp's comment: context a b c c b c y a b c has repeat counts 0 0 3 1 0 2 0 0 0 0,
    so c would extend a repeat of 3, b one of 1 and y one of 2."""
    a, b, c, y = 1, 2, 3, 4
    out = dry(torch.zeros(5), [a, b, c, c, b, c, y, a, b, c], multiplier=[1.0], base=[2.0],
              allowed_length=[1])
    assert out.tolist() == [0.0, 0.0, -1.0, -4.0, -2.0]  # b: 2^0, c: 2^2, y: 2^1


def test_dry_takes_the_longest_repeat_per_token():
    # 9 follows [5] (length 1) and [6 5] (length 2): the longer one counts.
    out = dry(torch.zeros(10), [5, 9, 6, 5, 9, 7, 6, 5], multiplier=[1.0], base=[3.0],
              allowed_length=[1])
    assert out[9].item() == -3.0


def test_dry_single_token_breaker_stops_a_match():
    history = [1, 9, 2, 3, 4, 1, 9, 2, 3]  # [1 9 2 3] repeats: 4 would make it 5 long
    free = dry(torch.zeros(10), history, multiplier=[1.0], base=[2.0], allowed_length=[2])
    assert free[4].item() == -4.0  # 2^(4 − 2)
    # Breaker 9: a repeat may not reach back across the last 9, so it is [2 3], length 2.
    cut = dry(torch.zeros(10), history, multiplier=[1.0], base=[2.0], allowed_length=[2],
              breakers=[((9,),)])
    assert cut[4].item() == -1.0
    assert torch.equal(cut[[0, 1, 2, 3, 5, 6, 7, 8, 9]], torch.zeros(9))
    # allowed 3 > the 2 tokens after the breaker: no penalty at all.
    none = dry(torch.zeros(10), history, multiplier=[1.0], base=[2.0], allowed_length=[3],
               breakers=[((9,),)])
    assert torch.equal(none, torch.zeros(10))


def test_dry_multi_token_breaker_needs_its_whole_sequence():
    history = [1, 9, 8, 2, 3, 4, 1, 9, 8, 2, 3]
    cut = dry(torch.zeros(10), history, multiplier=[1.0], base=[2.0], allowed_length=[2],
              breakers=[((9, 8),)])
    assert cut[4].item() == -1.0  # limited to [2 3] after "9 8"
    other = [1, 9, 7, 2, 3, 4, 1, 9, 7, 2, 3]  # 9 without 8 after it does not break
    free = dry(torch.zeros(10), other, multiplier=[1.0], base=[2.0], allowed_length=[2],
               breakers=[((9, 8),)])
    assert free[4].item() == -8.0  # [1 9 7 2 3] is 5 long: 2^3
    # A multi-token breaker's head is penalised like any token.
    out = dry(torch.zeros(10), [9, 1, 2, 9, 1, 2], multiplier=[1.0], base=[2.0],
              allowed_length=[2], breakers=[((9, 8),)])
    assert out[9].item() == -2.0


def test_dry_single_token_breaker_is_never_penalised():
    history = [1, 2, 9, 5, 1, 2]
    free = dry(torch.zeros(10), history, multiplier=[1.0], base=[2.0], allowed_length=[2])
    assert free[9].item() == -1.0
    exempt = dry(torch.zeros(10), history, multiplier=[1.0], base=[2.0], allowed_length=[2],
                 breakers=[((9,), (7, 7))])
    assert torch.equal(exempt, torch.zeros(10))


@pytest.mark.parametrize("last_n, expected", [(4, 0.0), (5, -1.0), (500, -1.0), (-1, -1.0),
                                              (2, 0.0)])
def test_dry_window_limits(last_n, expected):
    # Window [2 3 1 2] (last 4) holds no repeat of [1 2]; the last 5 do.
    out = dry(torch.zeros(6), [1, 2], prompt=(1, 2, 3), multiplier=[1.0], base=[2.0],
              allowed_length=[2], last_n=[last_n])
    assert out[3].item() == expected
    assert torch.equal(out[[0, 1, 2, 4, 5]], torch.zeros(5))


def test_dry_prompt_counts():
    out = dry(torch.zeros(6), [], prompt=(1, 2, 3, 1, 2), multiplier=[0.5], base=[1.75],
              allowed_length=[2])
    assert out[3].item() == -0.5


def test_dry_allowed_length_zero_follows_llama_cpp():
    """allowed_length 0: every repeat length (even 0) qualifies, so every token after the
    window's first gets multiplier · base^0 at least (llama.cpp does exactly this)."""
    out = dry(torch.zeros(9), [5, 6, 7], multiplier=[1.0], base=[2.0], allowed_length=[0])
    assert out.tolist() == [0.0] * 6 + [-1.0, -1.0, 0.0]


def test_dry_exponent_is_capped_to_stay_finite():
    history = [3] * 400  # 3 would extend a repeat of 398 tokens
    out = dry(torch.zeros(5), history, multiplier=[0.8], base=[1.75], allowed_length=[2])
    # int(88.7228391 / ln 1.75) = 158
    expected = np.float32(float(np.float32(0.8)) * float(np.float32(1.75)) ** 158)
    assert math.isfinite(out[3].item())
    assert out[3].item() == -float(expected)


def test_dry_base_one_is_a_flat_penalty():
    out = dry(torch.zeros(5), [1, 2, 3, 4, 1, 2, 3], multiplier=[0.7], base=[1.0],
              allowed_length=[1])
    assert out[4].item() == pytest.approx(-0.7)


def test_dry_leaves_minus_inf_and_short_windows():
    logits = torch.tensor([0.0, 1.0, -INF, 2.0])
    out = dry(logits, [1, 2, 3, 1, 2], multiplier=[1.0], base=[2.0], allowed_length=[2])
    assert out[2].item() == -INF
    assert out[3].item() == 1.0
    # Window no longer than allowed_length: nothing to do.
    out = dry(logits, [1, 1], multiplier=[1.0], base=[2.0], allowed_length=[2])
    assert torch.equal(out, logits)


@pytest.mark.parametrize("args", [
    dict(multiplier=[0.0], base=[1.75], last_n=[-1]),
    dict(multiplier=[0.8], base=[0.5], last_n=[-1]),
    dict(multiplier=[0.8], base=[1.75], last_n=[0]),
    dict(),  # defaults: multiplier 0
])
def test_dry_off_values_bit_identical(args):
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    state = make_state(prompt=(1, 2, 3, 1, 2), output=[3, 1, 2])
    out, _ = run(Dry, logits, [state], **args)
    assert torch.equal(out, logits)


def test_all_rows_off_return_without_touching_the_batch():
    logits = torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    states = [make_state(prompt=(1, 2, 1), output=[2]) for _ in range(2)]
    for cls, args in [(Dry, dict(multiplier=[0.0, 0.0])), (Penalties, dict(last_n=[0, 0]))]:
        _, candidates = run(cls, logits, states, **args)
        before = candidates.values
        assert torch.equal(before, logits)
        _, sparse = run(TopK, logits, states, k=[3, 3])
        values = sparse.values.clone()
        run(cls, logits, states, candidates=sparse, **args)
        assert torch.equal(sparse.values, values) and sparse._sorted


# -- DRY: against the llama.cpp port ------------------------------------------------------------
def _random_dry_case(g: torch.Generator):
    vocab = 6
    length = int(torch.randint(0, 60, (1,), generator=g))
    # Mostly repetitive: copies of a short random motif with noise.
    motif = torch.randint(0, vocab, (int(torch.randint(1, 6, (1,), generator=g)),),
                          generator=g).tolist()
    history = [motif[i % len(motif)] if float(torch.rand(1, generator=g)) < 0.8
               else int(torch.randint(0, vocab, (1,), generator=g)) for i in range(length)]
    split = int(torch.randint(0, length + 1, (1,), generator=g))
    breakers = tuple(tuple(torch.randint(0, vocab, (int(torch.randint(1, 3, (1,), generator=g)),),
                                         generator=g).tolist())
                     for _ in range(int(torch.randint(0, 3, (1,), generator=g))))
    args = dict(multiplier=float(torch.rand(1, generator=g)) * 2,
                base=[1.0, 1.2, 1.75, 3.0][int(torch.randint(0, 4, (1,), generator=g))],
                allowed_length=int(torch.randint(0, 5, (1,), generator=g)),
                last_n=[-1, 0, 1, 5, 20, 100][int(torch.randint(0, 6, (1,), generator=g))],
                breakers=breakers)
    return history[:split], history[split:], args


@pytest.mark.parametrize("seed", range(10))
def test_dry_matches_llama_cpp_port_on_random_histories(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    rows = 16
    logits = torch.randn(rows, 8, generator=g) * 2
    cases = [_random_dry_case(g) for _ in range(rows)]
    states = [make_state(prompt, output) for prompt, output, _ in cases]
    args = {p.name: [case[2][p.name] for case in cases] for p in Dry.params}
    out, _ = run(Dry, logits, states, **args)
    penalised = 0
    for row, (prompt, output, a) in enumerate(cases):
        theirs = llama_dry(logits[row].numpy(), [*prompt, *output], a["multiplier"], a["base"],
                           a["allowed_length"], a["last_n"], [list(b) for b in a["breakers"]])
        assert torch.equal(out[row], torch.from_numpy(theirs)), (row, prompt, output, a)
        penalised += not torch.equal(out[row], logits[row])
    assert penalised > 0


def test_dry_matches_llama_cpp_port_on_long_repeats():
    """Long runs past the exponent cap, a period-3 loop with a base just above 1.000001 (no
    cap), a breaker cutting a loop, and a breaker whose tail runs past the window's end."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 8, generator=g)
    histories = [[1] * 300, [1, 2, 3] * 120, [1, 2, 3] * 60 + [5] + [1, 2, 3] * 20,
                 [1, 2, 3] * 100 + [4, 1, 2]]
    states = [make_state((), h) for h in histories]
    settings = dict(multiplier=[0.8] * 4, base=[1.75, 1.000001, 1.75, 3.0], allowed_length=[2] * 4,
                    last_n=[-1, -1, -1, 250], breakers=[(), (), ((5,),), ((4, 1, 2, 3),)])
    out, _ = run(Dry, logits, states, **settings)
    for row, history in enumerate(histories):
        theirs = llama_dry(logits[row].numpy(), history, 0.8, settings["base"][row], 2,
                           settings["last_n"][row], [list(b) for b in settings["breakers"][row]])
        assert torch.equal(out[row], torch.from_numpy(theirs))
        assert not torch.equal(out[row], logits[row])


# -- both processors: batches, sparse candidates, specs -----------------------------------------
CASES = {
    Penalties: [dict(last_n=-1, repeat=1.4, frequency=0.3, presence=0.2),
                dict(last_n=0, repeat=1.4, frequency=0.3, presence=0.2),
                dict(last_n=6, repeat=0.7, frequency=0.0, presence=0.5),
                dict(last_n=64, repeat=1.0, frequency=0.0, presence=0.0)],
    Dry: [dict(multiplier=0.8, base=1.75, allowed_length=2, last_n=-1, breakers=()),
          dict(multiplier=0.0, base=1.75, allowed_length=2, last_n=-1, breakers=()),
          dict(multiplier=1.5, base=2.0, allowed_length=1, last_n=8, breakers=((3,),)),
          dict(multiplier=0.8, base=0.5, allowed_length=2, last_n=-1, breakers=())],
}


def _batch_inputs(seed: int, rows: int = 4, vocab: int = 12):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 2
    states = []
    for r in range(rows):
        top = torch.topk(logits[r], 6).indices.tolist()  # repeats of likely tokens
        prompt = [top[i % 3] for i in range(7)]
        output = [top[(i + 1) % 4] for i in range(6)] + [top[0], top[1]]
        states.append(make_state(prompt, output))
    return logits, states


def _args(cls, cases):
    return {p.name: [case[p.name] for case in cases] for p in cls.params}


@pytest.mark.parametrize("cls", [Penalties, Dry])
def test_batch_equals_single_rows_with_mixed_on_off(cls):
    logits, states = _batch_inputs(5)
    cases = CASES[cls]
    batched, _ = run(cls, logits, states, **_args(cls, cases))
    for row, case in enumerate(cases):
        single, _ = run(cls, logits[row], [states[row]], **_args(cls, [case]))
        assert torch.equal(batched[row], single[0])
    assert torch.equal(batched[1], logits[1]) and torch.equal(batched[3], logits[3])
    assert not torch.equal(batched[0], logits[0]) and not torch.equal(batched[2], logits[2])


@pytest.mark.parametrize("cls", [Penalties, Dry])
@pytest.mark.parametrize("k", [3, 6])
def test_sparse_after_top_k_equals_dense(cls, k):
    """After a top-k on every row the batch is sparse; with a top-k-off row beside it, dense.
    The penalty lands on the same tokens with the same values either way."""
    logits, states = _batch_inputs(6)
    cases = [CASES[cls][0], CASES[cls][2]]
    _, sparse = run(TopK, logits[:2], states[:2], k=[k, k])
    assert not sparse.dense
    sparse_out, _ = run(cls, logits[:2], states[:2], candidates=sparse, **_args(cls, cases))
    _, dense = run(TopK, logits[:3], states[:3], k=[k, k, 0])
    assert dense.dense
    dense_out, _ = run(cls, logits[:3], states[:3], candidates=dense,
                       **_args(cls, cases + [CASES[cls][1]]))
    assert torch.equal(sparse_out, dense_out[:2])
    assert torch.equal(dense_out[2], logits[2])
    top = torch.isfinite(sparse_out)
    assert not torch.equal(sparse_out[top], logits[:2][top])  # something was penalised


def test_processors_are_registered_and_run_from_a_policy_spec():
    assert PROCESSORS["penalties"] is Penalties and PROCESSORS["dry"] is Dry
    spec = parse_policy("llama", {
        "chain": [{"penalties": {"last_n": -1, "repeat": 2.0}},
                  {"dry": {"multiplier": 1.0, "base": 2.0, "allowed_length": 2,
                           "breakers": [[9], [7, 7]]}}],
        "select": "sample"})
    policy = resolve(spec, PolicyVersion(1, "x"), {})
    state = SequenceState("a", policy, (1, 2, 3), 0, frozenset(), [1, 2])
    logits = torch.tensor([0.0, 4.0, -2.0, 3.0, 1.0])
    ours = Engine(CPU).distribution(state, logits)
    # penalties: 1 → 2, 2 → −4, 3 → 1.5; dry: 3 continues [1 2] (length 2) → 1.5 − 1.
    expected = torch.log_softmax(torch.tensor([0.0, 2.0, -4.0, 0.5, 1.0]), dim=0)
    assert torch.allclose(ours, expected)


@pytest.mark.parametrize("entry, field", [
    ({"penalties": {"last_n": -2}}, "last_n"),
    ({"penalties": {"repeat": 0.0}}, "repeat"),
    ({"penalties": {"repeat": -1.5}}, "repeat"),
    ({"penalties": {"frequency": "3"}}, "frequency"),
    ({"penalties": {"last_n": 1.5}}, "last_n"),
    ({"dry": {"multiplier": True}}, "multiplier"),
    ({"dry": {"base": None}}, "base"),
    ({"dry": {"allowed_length": -1}}, "allowed_length"),
    ({"dry": {"last_n": -3}}, "last_n"),
    ({"dry": {"breakers": [[]]}}, "breakers"),
    ({"dry": {"breakers": [-1]}}, "breakers"),
    ({"dry": {"breakers": [[1, -2]]}}, "breakers"),
])
def test_invalid_parameters_name_the_field(entry, field):
    with pytest.raises(InvalidArgument) as error:
        parse_policy("bad", {"chain": [entry], "select": "greedy"})
    assert field in error.value.field
    assert field in error.value.message


# -- llama.cpp's ranges -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_penalties_take_uncapped_frequency_and_presence_as_llama_cpp(seed):
    """llama.cpp caps neither (`llama_sampler_init_penalties` takes any float): values past the
    flat parameters' [-2, 2] give llama.cpp's results."""
    g = torch.Generator().manual_seed(40 + seed)
    vocab = 40
    logits = torch.randn(4, vocab, generator=g) * 3
    settings = [(-1, 1.0, 5.0, 0.0), (-1, 1.2, -7.5, 3.0), (12, 0.9, 2.5, -40.0),
                (6, 1.0, -0.25, 12.0)]
    states = [make_state(torch.randint(0, vocab, (20,), generator=g).tolist(),
                         torch.randint(0, 10, (15,), generator=g).tolist()) for _ in settings]
    out = penalties_as_llama_cpp(logits, states, settings)
    assert all(not torch.equal(out[row], logits[row]) for row in range(len(settings)))
    spec = parse_policy("l", {"chain": [{"penalties": {"frequency": 5.0, "presence": -40.0}}],
                              "select": "sample"})
    assert dict(spec.chain[0][1])["frequency"] == 5.0


@pytest.mark.parametrize("flat", ["frequency_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [2.5, -2.01])
def test_flat_openai_penalties_keep_vllms_range(flat, value):
    with pytest.raises(InvalidArgument) as error:
        resolve_flat({flat: value})
    assert error.value.field == f"params.{flat}" and "[-2, 2]" in error.value.message


@pytest.mark.parametrize("seed", range(6))
def test_dry_negative_multiplier_and_any_base_match_llama_cpp_port(seed):
    """llama.cpp checks neither: a negative multiplier raises the tokens that would extend a
    repeat (its subtraction of a negative penalty); a base below 1 (negative too) is off."""
    g = torch.Generator().manual_seed(2000 + seed)
    rows = 12
    logits = torch.randn(rows, 8, generator=g) * 2
    cases = [_random_dry_case(g) for _ in range(rows)]
    for row, (_, _, args) in enumerate(cases):
        args["multiplier"] = -args["multiplier"] if row % 3 else args["multiplier"]
        args["base"] = [-1.5, 0.5, args["base"]][row % 3] if row % 2 else args["base"]
    states = [make_state(prompt, output) for prompt, output, _ in cases]
    args = {p.name: [case[2][p.name] for case in cases] for p in Dry.params}
    out, _ = run(Dry, logits, states, **args)
    raised = 0
    for row, (prompt, output, a) in enumerate(cases):
        theirs = llama_dry(logits[row].numpy(), [*prompt, *output], a["multiplier"], a["base"],
                           a["allowed_length"], a["last_n"], [list(b) for b in a["breakers"]])
        assert torch.equal(out[row], torch.from_numpy(theirs)), (row, a)
        raised += bool((out[row] > logits[row]).any())
    assert raised > 0


def test_a_change_past_float32s_range_saturates_and_a_masked_token_stays_masked():
    """Penalties and DRY never make a logit +inf or NaN (the peers' float32 arithmetic would,
    and their softmax would then be NaN): the result saturates at float32's max; a masked token
    stays −inf even when the penalty itself overflows to −inf."""
    top = torch.finfo(torch.float32).max
    logits = torch.tensor([[1.0, 2.0, -INF, 0.5]])
    state = make_state(prompt=(), output=[0, 0, 2, 2, 1])
    out, _ = run(Penalties, logits, [state], last_n=[-1], repeat=[1.0], frequency=[-3e38],
                 presence=[0.0])
    once = float(torch.tensor(2.0) - torch.tensor(-3e38))  # token 1, seen once: finite
    assert out[0].tolist() == [top, once, -INF, 0.5]  # token 0, seen twice: past the max
    out, _ = run(Penalties, logits, [state], last_n=[-1], repeat=[1.0], frequency=[3e38],
                 presence=[0.0])
    assert out[0].tolist() == [-INF, -once, -INF, 0.5]  # an overflow downwards: −inf, as theirs
    out, _ = run(Dry, torch.zeros(1, 4), [make_state((), [1, 2, 3, 1, 2])], multiplier=[-3e38],
                 base=[1.75], allowed_length=[1])  # [1 2] then 3: −3e38 · 1.75^1
    assert out[0].tolist() == [0.0, 0.0, 0.0, top]
    spec = parse_policy("p", {"chain": [{"penalties": {"last_n": -1, "frequency": -3e38}}],
                              "select": "sample"})
    policy = resolve(spec, PolicyVersion(1, "x"), {})
    chosen = Engine(CPU).step([SequenceState("a", policy, (), 0, frozenset(), [0, 0, 1])],
                              torch.tensor([[1.0, 2.0, 3.0, 0.5]]))
    assert chosen[0].token_id in (0, 1) and math.isfinite(chosen[0].logprob)
