"""`Engine.step` on sparse rows: whenever the rules accept a step, its choices (tokens, raw and
processed logprobs, entropies, top logprobs) equal those of the full rows on the same seeds,
for every processor and selector, every shipped policy and random chains, over several steps
with history. Refused steps name only rows, and a policy that can never pass is refused as such.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sampler_service.engine import Engine
from sampler_service.errors import FailedPrecondition
from sampler_service.policy.examples import STAGE_EXAMPLES
from sampler_service.policy.processors import PROCESSORS
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.selectors import SELECTORS
from sampler_service.policy.sparse import NotExact, SparseLogits
from sampler_service.policy.spec import parse_policy, resolve, resolve_flat
from sampler_service.state import SequenceState
from tests.unit.helpers import sparse_rows

CPU = torch.device("cpu")
VOCAB = 400
ROWS = 6
STEPS = 4
#: Ids the examples name (penalised history, stop and forced ids, newline and breaker ids).
PROMPT = (5, 6, 13, 42, 198, 25, 5, 6)
#: Raised in every step's logits, so the stages that name them act on sent tokens too.
BOOSTED = [5, 6, 7, 13]


def step_logits(step: int, rows: int = ROWS, vocab: int = VOCAB, scale: float = 3.0,
                quantum: float = 0.0, masked: int = 0) -> torch.Tensor:
    """Normal logits; `scale` 6 makes them about as peaked as a language model's; a `quantum`
    rounds them to its multiples (ties, as low-precision logits have); the last `masked` ids
    are −inf (a padded vocabulary)."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(900 + step)) * scale
    logits[:, BOOSTED] += 3 * scale
    logits = torch.round(logits / quantum) * quantum if quantum else logits
    logits[:, vocab - masked:] = -math.inf
    return logits


def inline(chain: list, select, **defaults):
    return resolve(parse_policy("inline", {"chain": chain, "select": select,
                                           "defaults": defaults}), PolicyVersion(1, "x"), {})


def make_states(policies, prompt=PROMPT) -> list[SequenceState]:
    return [SequenceState(f"s{i}", policy, tuple(prompt), 31 + i, frozenset({0}))
            for i, policy in enumerate(policies)]


def assert_same_choices(dense, sparse) -> None:
    """Equal tokens; raw logprobs and entropies within 1e-4. Processed values within 1e-4 or
    1e-4 relative: an adaptive temperature T from the raw entropy (float32 sums dense, float64
    sparse) scales them by 1/T, which magnifies the sums' rounding when T is tiny."""
    assert [o.token_id for o in sparse] == [o.token_id for o in dense]
    for a, b in zip(dense, sparse):
        for name in ("logprob", "entropy", "varentropy"):
            assert getattr(b, name) == pytest.approx(getattr(a, name), abs=1e-4), name
        assert b.processed_logprob == pytest.approx(a.processed_logprob, abs=1e-4, rel=1e-4)
        assert_same_top(b.top_logprobs, a.top_logprobs)
        assert_same_top(b.processed_top_logprobs, a.processed_top_logprobs, rel=1e-4)
        assert b.processed_stats == pytest.approx(a.processed_stats, abs=1e-4, rel=1e-4)
        assert b.explanation.keys() == a.explanation.keys()


def assert_same_top(mine, theirs, rel: float | None = None) -> None:
    """Equal top logprobs, up to the order of equal values and which of the values tied with
    the last one made the list (a top-k's choice among ties, dense or not)."""
    assert [v for _, v in mine] == pytest.approx([v for _, v in theirs], abs=1e-4, rel=rel)
    if theirs:
        last = theirs[-1][1]
        above = last + 1e-4 + (rel or 0.0) * abs(last)
        assert sorted(t for t, v in mine if v > above) == sorted(t for t, v in theirs if v > above)


def generate(policies, k: int, steps: int = STEPS, vocab: int = VOCAB, scale: float = 3.0,
             quantum: float = 0.0, masked: int = 0) -> tuple[int, list[tuple[str, str]]]:
    """Steps dense and sparse copies of the same sequences together; each step's dense choices
    are accepted by both (a refused row is resent in full); a step the full rows fail (every
    token masked) must fail sparse too, and ends the run. Returns (steps the rules accepted,
    every refusal's (field, description))."""
    dense_states, sparse_states = make_states(policies), make_states(policies)
    engine, accepted, refusals = Engine(CPU), 0, []
    for step in range(steps):
        logits = step_logits(step, len(policies), vocab, scale, quantum, masked)
        reference = step_logits(step + 100, len(policies), vocab, scale)  # kl_temperature's
        sparse_logits = sparse_rows(logits, k)
        try:
            dense = engine.step(dense_states, logits, processed_logprobs=True,
                                reference=reference)
        except FailedPrecondition:
            with pytest.raises(FailedPrecondition):  # NotExact is one too
                engine.step(sparse_states, sparse_logits, reference=reference)
            return accepted, refusals
        try:
            sparse = engine.step(sparse_states, sparse_logits, processed_logprobs=True,
                                 reference=reference)
        except NotExact as error:
            refusals.extend(error.violations)
        else:
            assert_same_choices(dense, sparse)
            accepted += 1
        for states in (dense_states, sparse_states):
            for state, outcome in zip(states, dense):
                state.record_step(outcome, vocab)
    return accepted, refusals


def off_values(key: str) -> dict:
    """The stage's parameters at their off values (those that have one)."""
    stage = {**PROCESSORS, **SELECTORS}[key]
    plain = {"int_map": dict, "token_bias": dict, "int_list": list, "int_lists": list}
    return {p.name: plain[p.kind](p.off) if p.kind in plain else p.off
            for p in stage.params if p.off is not None}


def truncation(stage: dict, k: int) -> dict:
    """A truncation to put beside `stage`: top-k (min-p beside top-k itself)."""
    return {"min_p": {"p": 0.05}} if "top_k" in stage else {"top_k": {"k": k}}


#: chain variants around a processor: alone, before a truncation, with greedy, after one.
VARIANTS = {
    "alone": lambda stage: ([stage], "sample"),
    "before a truncation": lambda stage: ([stage, truncation(stage, 40)], "sample"),
    "greedy": lambda stage: ([stage], "greedy"),
    "after a truncation": lambda stage: ([truncation(stage, 100), stage], "sample"),
}
#: Processors whose rule cannot pass on any sparse row (they read every raw logit).
NEVER = {"kl_temperature"}
#: Processors exact only once an earlier truncation excluded the tail.
AFTER_TRUNCATION = {"exponential_decay_length_penalty", "temp_ext", "top_n_sigma"}


@pytest.mark.parametrize("key", sorted(set(PROCESSORS) - {"structured"}))  # needs a tokenizer:
# tests/unit/policy/test_structured.py
def test_every_processor_chooses_as_on_full_rows(key):
    """Alone, every row has the example parameters; in the other variants rows alternate
    between them and the off values (one group)."""
    results = {}
    for name, variant in VARIANTS.items():
        on = inline(*variant({key: STAGE_EXAMPLES[key]}))
        off = on if name == "alone" else inline(*variant({key: off_values(key)}))
        results[name] = generate([on, off] * (ROWS // 2), k=128)
    for accepted, refusals in results.values():
        assert all(f.startswith("rows[") for f, _ in refusals)
    if key in NEVER:
        assert not any(accepted for accepted, _ in results.values())
        assert all(f.endswith(".policy") for f, d in results["greedy"][1] if d.startswith(key))
    else:  # once a truncation excluded the tail, only a decision within rounding is refused
        accepted, refusals = results["after a truncation"]
        assert accepted >= STEPS - 1 and all("rounding" in d for _, d in refusals), refusals
    greedy, refusals = results["greedy"]
    if PROCESSORS[key].keeps_argmax:  # planned away before greedy: nothing left to refuse
        assert greedy == STEPS and not refusals
    elif key in NEVER | AFTER_TRUNCATION:
        assert greedy == 0
        assert any(f.endswith(".policy") and d.startswith(key) for f, d in refusals)
    else:  # its own rule can pass before any truncation
        assert greedy > 0, refusals


@pytest.mark.parametrize("key", ["greedy", "sample", "mirostat", "entropix"])
def test_every_selector_chooses_as_on_full_rows(key):
    select = {key: STAGE_EXAMPLES[key]}
    truncated, refusals = generate([inline([{"top_k": {"k": 40}}], select)] * ROWS, k=64)
    assert truncated == STEPS, refusals
    alone, refusals = generate([inline([], select)] * ROWS, k=64)
    if key == "sample":  # it draws from the whole distribution: never
        assert alone == 0 and all(f.endswith(".policy") for f, _ in refusals)


def shipped(name: str, **overrides):
    spec, version, _ = PolicyRegistry.from_files().get(name)
    return resolve(spec, version, overrides)


@pytest.mark.parametrize("k", [64, 256])
@pytest.mark.parametrize("name, overrides", [
    ("greedy", {}), ("greedy", {"repetition_penalty": 1.3, "presence_penalty": 0.5}),
    ("default", {"temperature": 0.0}), ("default", {"top_k": 50, "temperature": 0.7}),
    ("default", {"top_p": 0.9, "repetition_penalty": 1.2, "frequency_penalty": 0.3}),
    ("default", {"min_p": 0.1}),
    ("creative", {}), ("creative", {"temperature": 1.2, "top_p": 0.8}),
    ("edt", {}), ("dynatemp", {}), ("entropix", {}),
])
def test_shipped_policies_choose_as_on_full_rows(name, overrides, k):
    accepted, refusals = generate([shipped(name, **overrides)] * ROWS, k=k, vocab=2000,
                                  steps=6, scale=6.0)
    assert accepted > 0, refusals


@pytest.mark.parametrize("name, reason", [("default", "sample:"), ("cot", "cot: groups")])
def test_shipped_policies_that_never_pass_are_refused_as_policies(name, reason):
    sparse = sparse_rows(step_logits(0, vocab=2000, scale=6.0), 256)
    with pytest.raises(NotExact) as caught:
        Engine(CPU).step(make_states([shipped(name)] * ROWS), sparse)
    assert [f for f, _ in caught.value.violations] == [f"rows[{i}].policy" for i in range(ROWS)]
    assert all(d.startswith(reason) for _, d in caught.value.violations)


#: Stages a random chain is drawn from, each with a strategy for its parameters.
STAGES = {
    "temperature": st.fixed_dictionaries({"temperature": st.sampled_from([0.0, 0.5, 0.8, 1.3])}),
    "top_k": st.fixed_dictionaries({"k": st.integers(-1, 90), "min_keep": st.integers(1, 3)}),
    "top_p": st.fixed_dictionaries({"p": st.floats(0.3, 1.0), "min_keep": st.integers(1, 3),
                                    "rule": st.sampled_from(["exact", "hf"])}),
    "min_p": st.fixed_dictionaries({"p": st.floats(0.0, 0.3)}),
    "typical_p": st.fixed_dictionaries({"p": st.floats(0.2, 1.0)}),
    "epsilon_cutoff": st.fixed_dictionaries({"epsilon": st.floats(0.0, 0.05)}),
    "eta_cutoff": st.fixed_dictionaries({"epsilon": st.floats(0.0, 0.05)}),
    "top_h": st.fixed_dictionaries({"top_h": st.floats(0.0, 1.0)}),
    "xtc": st.fixed_dictionaries({"probability": st.floats(-0.5, 1.5),
                                  "threshold": st.floats(-0.1, 0.6),
                                  "min_keep": st.integers(0, 2)}),
    "repetition_penalty": st.fixed_dictionaries({"penalty": st.floats(0.5, 2.0)}),
    "frequency_penalty": st.fixed_dictionaries({"penalty": st.floats(-1.0, 1.0)}),
    "presence_penalty": st.fixed_dictionaries({"penalty": st.floats(-1.0, 1.0)}),
    "logit_bias": st.fixed_dictionaries({"bias": st.dictionaries(
        st.integers(0, VOCAB - 1), st.floats(-5.0, 5.0), max_size=4)}),
    "min_tokens": st.fixed_dictionaries({"min_tokens": st.integers(0, 3)}),
    "penalties": st.fixed_dictionaries({"last_n": st.integers(-1, 8),
                                        "repeat": st.floats(0.5, 2.0),
                                        "frequency": st.floats(-6.0, 6.0),
                                        "presence": st.floats(-6.0, 6.0)}),
    "dry": st.fixed_dictionaries({"multiplier": st.floats(-2.0, 2.0),
                                  "base": st.floats(-1.0, 3.0),
                                  "allowed_length": st.integers(0, 2)}),
    "no_repeat_ngram": st.fixed_dictionaries({"size": st.integers(0, 2)}),
    "allowed_token_ids": st.fixed_dictionaries({"ids": st.lists(
        st.sampled_from(BOOSTED + [3, 100]), max_size=4)}),
    "edt": st.fixed_dictionaries({"t0": st.floats(0.5, 1.5), "theta": st.floats(0.0, 2.0)}),
    "hot_or_cold": st.fixed_dictionaries({"hot": st.floats(0.5, 1.5), "cold": st.floats(0.2, 1.0),
                                          "rule": st.sampled_from(["newline", "entropy"]),
                                          "newline_ids": st.just([6])}),
    "temp_ext": st.fixed_dictionaries({"temperature": st.floats(-0.5, 1.5),
                                       "delta": st.sampled_from([-0.5, 0.0, 0.5])}),
    "top_n_sigma": st.fixed_dictionaries({"n": st.floats(0.0, 3.0)}),
    "sed": st.fixed_dictionaries({"entropy_threshold": st.floats(0.0, 4.0)}),
}
SELECTS = ["sample", "greedy", {"mirostat": {"version": 1}}, {"mirostat": {"version": 2}},
           {"mirostat": {"version": 2, "tau": -1.0, "eta": -0.1}},
           {"entropix": {"clarifying_token_id": 6}}]


@st.composite
def chains(draw):
    keys = draw(st.lists(st.sampled_from(sorted(STAGES)), min_size=1, max_size=4, unique=True))
    chain = [{key: draw(STAGES[key])} for key in keys]
    return chain, draw(st.sampled_from(SELECTS))


@settings(max_examples=80, deadline=None)
@given(chains(), st.sampled_from([48, 128, 300]), st.sampled_from([3.0, 6.0]),
       st.sampled_from([0.0, 0.5]), st.sampled_from([0, 120]))
def test_random_chains_choose_as_on_full_rows(case, k, scale, quantum, masked):
    """With a greedy row of another policy in the batch (two groups); with and without ties;
    with a padded vocabulary whose −inf ids may fill the whole tail."""
    chain, select = case
    generate([inline(chain, select, logprobs=3)] * 3 + [resolve_flat({"temperature": 0.0})],
             k=k, steps=3, scale=scale, quantum=quantum, masked=masked)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["greedy", "creative", "edt", "entropix"])
def test_cuda_chooses_on_sparse_rows_what_the_cpu_chooses(name):
    logits = step_logits(0, vocab=4096, scale=6.0)
    sparse = sparse_rows(logits, 256)
    on_cuda = SparseLogits(*(t.cuda() for t in (sparse.ids, sparse.values, sparse.tail_max,
                                                 sparse.tail_lse, sparse.tail_mean,
                                                 sparse.tail_mean_square)), vocab=sparse.vocab)
    cpu = Engine(CPU).step(make_states([shipped(name)] * ROWS), sparse)
    cuda = Engine(torch.device("cuda")).step(make_states([shipped(name)] * ROWS), on_cuda)
    assert [o.token_id for o in cuda] == [o.token_id for o in cpu]
    assert [o.entropy for o in cuda] == pytest.approx([o.entropy for o in cpu], abs=1e-4)


def test_top_p_rule_hf_needs_the_tail_excluded():
    """Hugging Face's rule sums the whole row in its ascending order: alone on raw sparse rows
    it is refused, naming its rule; after a top-k that excludes the tail it chooses as on the
    full rows."""
    alone = inline([{"top_p": {"p": 0.9, "rule": "hf"}}], "sample")
    with pytest.raises(NotExact) as caught:
        Engine(CPU).step(make_states([alone] * 2), sparse_rows(step_logits(0, rows=2), 64))
    assert all("top_p (rule hf)" in d for _, d in caught.value.violations)
    after = inline([{"top_k": {"k": 40}}, {"top_p": {"p": 0.9, "rule": "hf"}}], "sample",
                   logprobs=3)
    accepted, refusals = generate([after] * ROWS, k=64)
    assert accepted == STEPS and not refusals
