"""CoT decoding: what its branches report as processed logprobs and keep as histories, against
a straightforward recomputation from the logits."""
from __future__ import annotations

import math

import pytest
import torch

from tests.unit.helpers import entropy_varentropy, group_step, make_group, random_logits

VOCAB = 30


def cot_spec(chain: list, **cot) -> dict:
    return {"chain": chain, "select": {"cot": {"k": 3, **cot}},
            "defaults": {"max_tokens": 4, "logprobs": 2}}


def test_the_branching_step_reports_each_first_token_under_the_chains_distribution():
    """The k branches are the k best tokens of softmax(chain output) (here temperature 0.5,
    then top-k 5); each reports its token's log-probability there, the 2 best and that
    distribution's statistics. The greedy steps after report the point mass (log p = 0)."""
    group = make_group(cot_spec([{"temperature": {"temperature": 0.5}}, {"top_k": {"k": 5}}]),
                       eos=())
    logits = random_logits(0, 1, VOCAB)
    rows = group_step(group, logits, processed_logprobs=True).rows
    scaled = logits[0] / 0.5
    kept = torch.full_like(scaled, -math.inf)
    best = torch.topk(scaled, 5).indices
    kept[best] = scaled[best]
    distribution = torch.log_softmax(kept, dim=-1)
    assert [r.token_id for r in rows] == torch.topk(distribution, 3).indices.tolist()
    assert [r.parent for r in rows] == [0, 0, 0]
    top = torch.topk(distribution, 2)
    for row in rows:
        assert row.processed_logprob == pytest.approx(float(distribution[row.token_id]),
                                                      rel=1e-6, abs=1e-6)
        assert [t for t, _ in row.processed_top_logprobs] == top.indices.tolist()
        assert [v for _, v in row.processed_top_logprobs] == pytest.approx(
            top.values.tolist(), rel=1e-6, abs=1e-6)
        assert row.processed_stats == pytest.approx(entropy_varentropy(kept), rel=1e-5, abs=1e-6)
    later = group_step(group, random_logits(1, 3, VOCAB), processed_logprobs=True).rows
    assert [r.processed_logprob for r in later] == [0.0, 0.0, 0.0]


def test_a_truncation_ending_the_chain_bounds_the_branches():
    """The branches continue greedily, and a greedy row's chain leaves out a trailing top-k
    (it keeps the argmax); the branching step still runs it: top-k 2 leaves 2 of k = 3."""
    group = make_group(cot_spec([{"top_k": {"k": 2}}]), eos=())
    logits = random_logits(0, 1, VOCAB)
    rows = group_step(group, logits, processed_logprobs=True).rows
    assert [r.token_id for r in rows] == torch.topk(logits[0], 2).indices.tolist()
    pair = torch.log_softmax(torch.topk(logits[0], 2).values, dim=-1)
    assert [r.processed_logprob for r in rows] == pytest.approx(pair.tolist(), rel=1e-6)
    assert group.running_rows == 2


def test_processed_logprobs_only_when_asked():
    group = make_group(cot_spec([]), eos=())
    for row in group_step(group, random_logits(0, 1, VOCAB)).rows:
        assert (row.processed_logprob, row.processed_top_logprobs, row.processed_stats) == (
            None, (), None)


def chaotic_spec() -> dict:
    return cot_spec([{"sed": {"entropy_threshold": 1.5, "ratio_threshold": 0.0}}], k=2,
                    branch_at="chaotic_point")


def peaked(favourite: int, vocab: int = VOCAB) -> torch.Tensor:
    """A [1, vocab] row whose raw entropy is well below 1.5 nats."""
    row = torch.zeros(1, vocab)
    row[0, favourite] = 12.0
    return row


def test_a_branching_at_a_chaotic_point_reports_like_the_first_step():
    """The trunk's greedy steps report the point mass; the step that branches (its raw entropy
    above 1.5 nats) reports each branch's token under softmax(chain output), here the raw
    distribution (`sed` only watches)."""
    group = make_group(chaotic_spec(), eos=())
    calm = group_step(group, peaked(4), processed_logprobs=True).rows
    assert [(r.token_id, r.processed_logprob) for r in calm] == [(4, 0.0)]
    logits = random_logits(1, 1, VOCAB, scale=0.5)
    rows = group_step(group, logits, processed_logprobs=True).rows
    assert len(rows) == 2 and rows[0].explanation["sed"]["chaotic"] is True
    raw = torch.log_softmax(logits[0], dim=-1)
    assert [r.token_id for r in rows] == torch.topk(raw, 2).indices.tolist()
    assert [r.processed_logprob for r in rows] == pytest.approx(
        [float(raw[r.token_id]) for r in rows], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("spec", [cot_spec([]), chaotic_spec()], ids=["first-step", "chaotic"])
def test_each_branch_keeps_the_raw_statistics_of_each_of_its_tokens(spec):
    """A branch's history is the trunk's, then its own rows' raw (entropy, varentropy); a
    branch that stops early (EOS at its second step) keeps the history it had."""
    group = make_group(spec, eos=(0,))
    trunk: list[tuple[float, float]] = []
    if spec["select"]["cot"].get("branch_at") == "chaotic_point":
        logits = peaked(4)
        group_step(group, logits)
        trunk.append(entropy_varentropy(logits[0]))
    logits = random_logits(1, 1, VOCAB, scale=0.5)
    logits[0, 0] = -30.0
    k = len(group_step(group, logits).rows)
    histories = [trunk + [entropy_varentropy(logits[0])] for _ in range(k)]
    live = list(range(k))
    step = 2
    while not group.finished:
        logits = random_logits(step, len(live), VOCAB)
        logits[:, 0] = -30.0
        if step == 2:
            logits[1, 0] = 30.0  # the second branch ends here
        for row, branch in enumerate(live):
            histories[branch].append(entropy_varentropy(logits[row]))
        rows = group_step(group, logits).rows
        live = [branch for branch, row in zip(live, rows) if not row.finished]
        for hypothesis in group.running():
            assert len(hypothesis.entropies) == len(hypothesis.token_ids)
            assert list(hypothesis.entropies) == pytest.approx(
                [h for h, _ in histories[hypothesis.branch]], rel=1e-5, abs=1e-6)
        step += 1
    paths = group.hypotheses()
    assert sorted(len(p.token_ids) for p in paths) == [len(trunk) + 2] + [4] * (k - 1)
    for path in paths:
        assert len(path.entropies) == len(path.varentropies) == len(path.token_ids)
        assert list(path.entropies) == pytest.approx([h for h, _ in histories[path.branch]],
                                                     rel=1e-5, abs=1e-6)
        assert list(path.varentropies) == pytest.approx([v for _, v in histories[path.branch]],
                                                        rel=1e-5, abs=1e-6)
