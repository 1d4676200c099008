"""`Engine.step`: a row's choice does not depend on its batch mates, seeds make it repeatable,
and the reported statistics (entropy, varentropy, raw and processed logprobs) are right."""
from __future__ import annotations

import math

import pytest
import torch

from sampler_service.engine import Engine
from sampler_service.policy.statistics import raw_statistics
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.spec import parse_policy, resolve, resolve_flat
from sampler_service.state import SequenceState

CPU = torch.device("cpu")
INF = math.inf
VOCAB = 300
STEPS = 8
LN2 = math.log(2)


def custom(name: str, raw: dict, **overrides):
    return resolve(parse_policy(name, raw), PolicyVersion(1, "x"), overrides)


#: (policy, prompt, output so far, seed, eos ids): different policies, parameters, positions.
def mixed_specs():
    return [
        (resolve_flat({}), (1, 2, 3), [], 11, {0}),  # everything off
        (resolve_flat({"temperature": 0.7, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.2,
                       "frequency_penalty": 0.3, "presence_penalty": 0.2, "min_tokens": 3}),
         (4, 5, 6), [], 12, {0}),
        (resolve_flat({"temperature": 0.0, "repetition_penalty": 1.5}), (7,), [8, 9], 13, {0}),
        (resolve_flat({"min_p": 0.1, "temperature": 1.3}), (1,), [2, 2, 2], 14, {0}),
        (resolve_flat({"top_k": 5}), (), [], 15, {0}),  # alone: sparse; in the batch: dense
        (custom("creative", {"chain": [{"top_p": {"p": 0.95}},
                                       {"temperature": {"temperature": 0.8}},
                                       {"top_k": {"k": 40}}, {"min_p": {"p": 0.05}}],
                             "select": "sample"}), (3, 3), [1], 16, {0}),
        (custom("greedy", {"chain": [{"repetition_penalty": {"penalty": 1.5}}], "select": "greedy",
                           "defaults": {"logprobs": 5}}), (10, 11), [], 17, {0}),
        (resolve_flat({"logprobs": 3}), (), [4] * 5, 18, {0}),  # everything off, other seed
    ]


def make_states(specs, seed_shift: int = 0) -> list[SequenceState]:
    return [SequenceState(f"s{i}", policy, tuple(prompt), seed + seed_shift, frozenset(eos),
                          list(output))
            for i, (policy, prompt, output, seed, eos) in enumerate(specs)]


def step_logits(step: int, rows: int) -> torch.Tensor:
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(500 + step)) * 2
    logits[:, 0] += 4.0  # EOS is likely: min_tokens must hold it back
    return logits


def generate(states, rows_of_logits=None, processed=True):
    """Steps `states` together STEPS times; returns the outcomes of every step."""
    engine, history = Engine(CPU), []
    rows = rows_of_logits if rows_of_logits is not None else list(range(len(states)))
    for step in range(STEPS):
        logits = step_logits(step, len(mixed_specs()))[rows]
        outcomes = engine.step(states, logits, processed_logprobs=processed)
        for state, outcome in zip(states, outcomes):
            state.accept(outcome.token_id, outcome.entropy, outcome.varentropy)
        history.append(outcomes)
    return history


def test_choice_alone_equals_choice_in_a_mixed_batch():
    batched = generate(make_states(mixed_specs()))
    for row in range(len(mixed_specs())):
        alone = generate(make_states(mixed_specs()[row:row + 1]), [row])
        for step in range(STEPS):
            a, b = alone[step][0], batched[step][row]
            assert a.token_id == b.token_id, (row, step)
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert a.entropy == pytest.approx(b.entropy, abs=1e-5)
            assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
            assert a.processed_logprob == pytest.approx(b.processed_logprob, abs=1e-5)
            assert ([t for t, _ in a.processed_top_logprobs]
                    == [t for t, _ in b.processed_top_logprobs])


def test_min_tokens_holds_eos_and_stop_ids_back_until_reached():
    held = resolve_flat({"temperature": 0.0, "min_tokens": 3, "stop_token_ids": [1]})
    free = resolve_flat({"temperature": 0.0, "stop_token_ids": [1]})
    states = [SequenceState("held", held, (), 0, frozenset({0})),
              SequenceState("free", free, (), 0, frozenset({0})),
              SequenceState("sampled", resolve_flat({"min_tokens": 3, "stop_token_ids": [1]}),
                            (), 5, frozenset({0}))]
    logits = torch.tensor([10.0, 9.0, 8.0, 0.0]).expand(3, -1).contiguous()
    engine, chosen = Engine(CPU), []
    for _ in range(4):
        outcomes = engine.step(states, logits)
        chosen.append([o.token_id for o in outcomes])
        for state, outcome in zip(states, outcomes):
            state.output_ids.append(outcome.token_id)  # no finish: keep stepping
            state.history.append(outcome.token_id)
    assert [c[0] for c in chosen] == [2, 2, 2, 0]
    assert [c[1] for c in chosen] == [0, 0, 0, 0]
    assert all(c[2] not in (0, 1) for c in chosen[:3])


def test_same_seeds_same_tokens_and_other_seeds_differ():
    def tokens(shift):
        return [[o.token_id for o in step] for step in generate(make_states(mixed_specs(), shift))]

    first, again, other = tokens(0), tokens(0), tokens(1000)
    assert first == again
    sampled_rows = [0, 1, 3, 5, 7]
    assert [[s[r] for r in sampled_rows] for s in first] != [[s[r] for r in sampled_rows]
                                                             for s in other]
    greedy_rows = [2, 6]  # seeds change nothing there
    assert [[s[r] for r in greedy_rows] for s in first] == [[s[r] for r in greedy_rows]
                                                            for s in other]


def test_batch_order_does_not_matter():
    specs = mixed_specs()
    order = [5, 2, 7, 0, 4, 1, 6, 3]
    straight = generate(make_states(specs))
    shuffled = generate(make_states([specs[i] for i in order]), order)
    for step in range(STEPS):
        assert ([straight[step][i].token_id for i in order]
                == [o.token_id for o in shuffled[step]])


def test_step_leaves_logits_and_states_untouched():
    engine = Engine(CPU)
    for specs in (mixed_specs(), mixed_specs()[1:2]):  # several groups, and one group
        states = make_states(specs)
        logits = step_logits(0, len(specs))
        before = logits.clone()
        outputs = [list(s.output_ids) for s in states]
        engine.step(states, logits, processed_logprobs=True)
        assert torch.equal(logits, before)
        assert [s.output_ids for s in states] == outputs


# -- statistics -------------------------------------------------------------------------------
def one_step(logits, params=None, processed=False, policy=None):
    state = SequenceState("s", policy or resolve_flat(params or {}), (), 0, frozenset())
    logits = torch.as_tensor(logits, dtype=torch.float32).unsqueeze(0)
    return Engine(CPU).step([state], logits, processed_logprobs=processed)[0], state


def test_entropy_of_uniform_distribution():
    outcome, _ = one_step(torch.zeros(4))
    assert outcome.entropy == pytest.approx(math.log(4), abs=1e-6)
    assert outcome.varentropy == pytest.approx(0.0, abs=1e-6)
    assert outcome.logprob == pytest.approx(-math.log(4), abs=1e-6)


def test_entropy_and_varentropy_of_half_quarter_quarter():
    # H = 1.5 ln 2; V = ½(½ ln 2)² + ¼(½ ln 2)² · 2 = ¼ (ln 2)².
    # The −inf token weighs nothing.
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25, 0.0]))
    outcome, _ = one_step(logits + 30.0)  # shift invariance, too
    assert outcome.entropy == pytest.approx(1.5 * LN2, abs=1e-6)
    assert outcome.varentropy == pytest.approx(0.25 * LN2 ** 2, abs=1e-6)
    assert outcome.token_id != 3


def test_raw_statistics_match_float64_reference():
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(9)) * 4
    logits[2, ::3] = -INF
    stats = raw_statistics(logits)
    logp = torch.log_softmax(logits.double(), dim=1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    entropy = -plogp.sum(dim=1)
    centred = torch.where(p > 0, logp + entropy.unsqueeze(1), torch.zeros_like(p))
    varentropy = (p * centred ** 2).sum(dim=1)
    assert torch.allclose(stats.entropy.double(), entropy, atol=1e-4)
    assert torch.allclose(stats.varentropy.double(), varentropy, atol=1e-3, rtol=1e-4)
    assert torch.allclose(stats.log_normalizer.double(), torch.logsumexp(logits.double(), 1),
                          atol=1e-5)


def test_raw_statistics_blocks_agree_with_single_rows():
    logits = torch.randn(300, 4096, generator=torch.Generator().manual_seed(10)) * 3
    whole = raw_statistics(logits)  # 128 rows per block: three blocks
    for row in (0, 127, 128, 255, 256, 299):
        single = raw_statistics(logits[row:row + 1])
        assert whole.entropy[row].item() == pytest.approx(single.entropy.item(), abs=1e-6)
        assert whole.varentropy[row].item() == pytest.approx(single.varentropy.item(), abs=1e-5)
        assert whole.log_normalizer[row].item() == pytest.approx(single.log_normalizer.item(),
                                                                 abs=1e-6)


def test_chosen_logprob_is_raw_and_processed_on_request():
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0, 1.5, 0.5])
    params = {"temperature": 0.5, "top_k": 2, "logprobs": 2}
    outcome, state = one_step(logits, params, processed=True)
    raw = torch.log_softmax(logits, dim=0)
    assert outcome.token_id in (1, 4)
    assert outcome.logprob == pytest.approx(float(raw[outcome.token_id]), abs=1e-6)
    processed = torch.log_softmax(torch.tensor([2.0, 1.5]) / 0.5, dim=0)
    expected = dict(zip((1, 4), processed.tolist()))
    assert outcome.processed_logprob == pytest.approx(expected[outcome.token_id], abs=1e-6)
    assert [t for t, _ in outcome.processed_top_logprobs] == [1, 4]
    assert [v for _, v in outcome.processed_top_logprobs] == pytest.approx(processed.tolist(),
                                                                          abs=1e-6)
    dist = Engine(CPU).distribution(state, logits)
    assert torch.isfinite(dist).nonzero().flatten().tolist() == [1, 4]
    assert dist[outcome.token_id].item() == pytest.approx(outcome.processed_logprob, abs=1e-6)


def test_processed_logprob_not_reported_unless_asked():
    outcome, _ = one_step(torch.zeros(4), {"logprobs": 2})
    assert outcome.processed_logprob is None
    assert outcome.processed_top_logprobs == ()


def test_top_logprobs_sorted_best_first():
    logits = torch.tensor([0.3, 2.0, -1.0, 1.5, 2.5, 0.0, 1.0, -0.5])
    outcome, _ = one_step(logits, {"logprobs": 3, "temperature": 0.0})
    raw = torch.log_softmax(logits, dim=0)
    assert [t for t, _ in outcome.top_logprobs] == [4, 1, 3]
    values = [v for _, v in outcome.top_logprobs]
    assert values == sorted(values, reverse=True)
    assert values == pytest.approx(raw[[4, 1, 3]].tolist(), abs=1e-6)
    assert outcome.token_id == 4
    assert outcome.logprob == pytest.approx(values[0], abs=1e-6)


def test_top_logprobs_capped_by_vocab_and_skip_minus_inf():
    logits = torch.tensor([0.0, -INF, 1.0, -INF, 2.0])
    outcome, _ = one_step(logits, {"logprobs": 20})
    assert [t for t, _ in outcome.top_logprobs] == [4, 2, 0]


def test_top_logprobs_per_row_count_in_a_batch():
    states = [SequenceState(f"s{n}", resolve_flat({"logprobs": n}), (), 0, frozenset())
              for n in (0, 2, 5)]
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    outcomes = Engine(CPU).step(states, logits)
    assert [len(o.top_logprobs) for o in outcomes] == [0, 2, 5]


def test_greedy_ties_go_to_lowest_id_through_the_engine():
    greedy = custom("greedy", {"select": "greedy"})
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0])
    for policy in (greedy, resolve_flat({"temperature": 0.0}),
                   resolve_flat({"temperature": 0.0, "top_k": 2})):
        outcome, _ = one_step(logits, policy=policy, processed=True)
        assert outcome.token_id == 1
        assert outcome.processed_logprob == 0.0
    outcome, _ = one_step(torch.zeros(7), policy=greedy)
    assert outcome.token_id == 0


# -- compaction and shared raw rows -------------------------------------------------------------
WIDE_VOCAB = 2048  # > COMPACT_WIDTH as `compactions` sets it: min-p, top-nσ compact a batch


def wide_specs():
    """Policies whose chains mask below a threshold (min-p, top-nσ) over a wide vocabulary."""
    return [
        (resolve_flat({"min_p": 0.05, "temperature": 0.8}), (1,), [], 21, {0}),
        (custom("minp", {"chain": [{"min_p": {"p": 0.05}}, {"temperature": {"temperature": 0.7}}],
                         "select": "sample"}), (2, 3), [4], 22, {0}),
        (custom("sigma", {"chain": [{"top_n_sigma": {"n": 1.0}},
                                    {"temperature": {"temperature": 1.2}}],
                          "select": "sample"}), (), [], 23, {0}),
        (resolve_flat({"temperature": 0.9, "top_k": 50, "min_p": 0.1, "repetition_penalty": 1.1,
                       "logprobs": 4}), (5, 6), [7], 24, {0}),
        (resolve_flat({"temperature": 0.6, "top_p": 0.9, "min_p": 0.02}), (), [], 25, {0}),
        (resolve_flat({"temperature": 0.0, "logprobs": 2}), (), [], 26, {0}),
        (resolve_flat({}), (), [], 27, {0}),
        (custom("greedy", {"select": "greedy"}), (), [], 28, {0}),
    ]


def wide_logits(step: int, rows: int) -> torch.Tensor:
    logits = torch.randn(rows, WIDE_VOCAB, generator=torch.Generator().manual_seed(900 + step)) * 2
    logits[:, 0] += 4.0
    logits[:, 17] = logits.amax(dim=1)  # a tie at the best: ties go to the lowest id
    return logits


def run_wide(specs, repeat: int = 1, steps: int = 4, given_statistics: bool = False):
    """Steps `specs` (each repeated `repeat` times, so ≥ 8 rows take the parallel kernels) and
    returns every outcome; checks on the way that the raw logits are never written.
    `given_statistics`: the engine gets the rows' raw statistics (as validation hands them)."""
    from sampler_service.policy.statistics import raw_statistics
    states = make_states([spec for spec in specs for _ in range(repeat)])
    engine, history = Engine(CPU), []
    for step in range(steps):
        logits = wide_logits(step, len(states))
        before = logits.clone()
        outcomes = engine.step(states, logits, processed_logprobs=True,
                               statistics=raw_statistics(logits) if given_statistics else None)
        assert torch.equal(logits, before)
        for state, outcome in zip(states, outcomes):
            state.accept(outcome.token_id, outcome.entropy, outcome.varentropy)
        history.append(outcomes)
    return history


@pytest.fixture
def compactions(monkeypatch):
    """Counts the batches `compact_at_least` turned sparse (a row count ≤ the width), with a
    width of 1024 < WIDE_VOCAB whatever the module's tuned default."""
    pytest.importorskip("numba")
    from sampler_service.kernels import cpu_compact
    from sampler_service.policy import candidates as candidates_module
    monkeypatch.setattr(candidates_module, "COMPACT_WIDTH", 1024)
    original, done = cpu_compact.compact_at_least, []

    def counted(logits, threshold, width, threads):
        values, ids, kept = original(logits, threshold, width, threads)
        done.append(int(kept.max()) <= width)
        return values, ids, kept

    monkeypatch.setattr(cpu_compact, "compact_at_least", counted)
    return done


@pytest.mark.parametrize("batch", ["mixed", "uniform"])
def test_compaction_changes_no_outcome(monkeypatch, compactions, batch):
    from sampler_service.policy import candidates as candidates_module
    specs = wide_specs()
    runs = ([(specs, 2)] if batch == "mixed"  # several groups, each on its own rows
            else [([spec], 10) for spec in specs[:5]])  # one group: shared raw rows
    for chosen_specs, repeat in runs:
        compactions.clear()
        compacted = run_wide(chosen_specs, repeat)
        assert any(compactions), chosen_specs[0][0].name  # the fast path ran
        with monkeypatch.context() as patch:
            patch.setattr(candidates_module, "COMPACT_WIDTH", 0)
            compactions.clear()
            masked = run_wide(chosen_specs, repeat)
            assert not compactions
        for step, (a_step, b_step) in enumerate(zip(compacted, masked)):
            for row, (a, b) in enumerate(zip(a_step, b_step)):
                where = (batch, step, row)
                assert a.token_id == b.token_id, where
                assert a.logprob == b.logprob, where
                assert (a.entropy, a.varentropy) == (b.entropy, b.varentropy), where
                assert a.top_logprobs == b.top_logprobs, where
                assert a.processed_logprob == pytest.approx(b.processed_logprob, abs=1e-6), where
                # tied entries (column 17 ties the best) come in no promised order
                a_top, b_top = dict(a.processed_top_logprobs), dict(b.processed_top_logprobs)
                assert a_top.keys() == b_top.keys(), where
                assert list(a_top.values()) == pytest.approx(
                    [v for _, v in b.processed_top_logprobs], abs=1e-6), where
                assert [a_top[t] for t in b_top] == pytest.approx(list(b_top.values()),
                                                                abs=1e-6), where
                assert a.processed_stats == pytest.approx(b.processed_stats, abs=1e-5), where
    tokens = {o.token_id for step in compacted for o in step}
    assert len(tokens) > 1


@pytest.mark.parametrize("batch", ["mixed", "uniform"])
def test_the_raw_rows_known_maxima_change_no_outcome(monkeypatch, batch):
    """The chain starts from the raw rows' maxima (their statistics' first argmax), kept
    through temperature: every outcome equals the one found by a pass over the values."""
    from sampler_service.policy.candidates import Candidates
    specs = wide_specs()
    runs = [(specs, 2)] if batch == "mixed" else [([spec], 9) for spec in specs]
    for chosen_specs, repeat in runs:
        known = run_wide(chosen_specs, repeat)
        with monkeypatch.context() as patch:
            patch.setattr(Candidates, "_known_maxima", lambda self: None)
            found = run_wide(chosen_specs, repeat)
        for step, (a_step, b_step) in enumerate(zip(known, found)):
            for row, (a, b) in enumerate(zip(a_step, b_step)):
                assert a == b, (batch, step, row)


def test_statistics_handed_over_by_validation_change_no_outcome():
    """`Engine.step(statistics=...)` (validation's raw statistics, without top entries) gives
    every outcome, top logprobs included, as computing them itself does."""
    specs = wide_specs()
    assert run_wide(specs, 2, given_statistics=True) == run_wide(specs, 2)


def test_greedy_without_stages_takes_the_raw_first_argmax_and_writes_nothing(monkeypatch):
    from sampler_service.policy.candidates import Candidates
    greedy = custom("greedy", {"select": "greedy"})
    logits = wide_logits(0, 9)
    states = [SequenceState(f"g{i}", greedy, (), i, frozenset()) for i in range(9)]
    with monkeypatch.context() as patch:  # no stage ran: the raw statistics' best_id is used
        patch.setattr(Candidates, "argmax", lambda self: pytest.fail("argmax pass over rows"))
        tokens = [o.token_id for o in Engine(CPU).step(states, logits)]
    assert tokens == torch.argmax(logits, dim=1).tolist()
    for policy in (greedy, resolve_flat({"temperature": 0.0})):
        states = [SequenceState(f"g{i}", policy, (), i, frozenset()) for i in range(9)]
        logits = wide_logits(0, 9)
        logits[3, 0] = -INF
        logits[3, 5] = logits[3].amax()  # ties at 5 and 17: the lowest id wins
        logits[4] = 0.0  # all tied
        before = logits.clone()
        outcomes = Engine(CPU).step(states, logits, processed_logprobs=True)
        assert torch.equal(logits, before)
        expected = [int(torch.nonzero(row == row.max())[0]) for row in logits]
        assert [o.token_id for o in outcomes] == expected
        assert expected[3] == 5 and expected[4] == 0
        assert all(o.processed_logprob == 0.0 for o in outcomes)


def test_sampling_chain_over_the_whole_batch_leaves_raw_logits_untouched(compactions):
    policy = custom("minp", {"chain": [{"repetition_penalty": {"penalty": 1.3}},
                                       {"min_p": {"p": 0.05}}, {"top_k": {"k": 50}},
                                       {"temperature": {"temperature": 0.7}}],
                             "select": "sample"})
    states = [SequenceState(f"s{i}", policy, (1, 2), i, frozenset(), [3, 17])
              for i in range(9)]
    logits = wide_logits(1, 9)
    before = logits.clone()
    outcomes = Engine(CPU).step(states, logits, processed_logprobs=True)
    assert torch.equal(logits, before)
    assert any(compactions)
    raw = torch.log_softmax(logits.double(), dim=1)
    for row, outcome in enumerate(outcomes):
        assert outcome.logprob == pytest.approx(float(raw[row, outcome.token_id]), abs=1e-5)
        # min-p 0.05 keeps tokens within ln 20 of the (penalised) best
        assert float(logits[row, outcome.token_id]) >= float(logits[row].amax()) - math.log(20) - 1


def test_shipped_policies_over_the_whole_batch_leave_raw_logits_untouched(compactions):
    """Every shipped policy that selects per row, as one group (shared raw rows)."""
    from sampler_service.policy.processors.base import Selector
    from sampler_service.policy.registry import shipped_policies
    stepped = []
    for name, spec in shipped_policies().items():
        policy = resolve(spec, PolicyVersion(1, "x"), {})
        if not isinstance(policy.selector.stage, Selector):
            continue  # a group selector (CoT decoding) runs outside Engine.step
        states = [SequenceState(f"s{i}", policy, (1, 2), i, frozenset({0}), [3, 17])
                  for i in range(9)]
        logits = wide_logits(2, 9)
        before = logits.clone()
        Engine(CPU).step(states, logits, processed_logprobs=True)
        assert torch.equal(logits, before), name
        stepped.append(name)
    assert {"greedy", "default", "creative"} <= set(stepped)
