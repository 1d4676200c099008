"""Beam search: its step (`advance`) on hand-made log-probabilities, and a group's answers
(processed logprobs) and histories against a straightforward recomputation from the logits."""
from __future__ import annotations

import math

import pytest
import torch

from sampler_service.groups.beam import NEG, BeamSettings, Beams, advance
from sampler_service.state import FinishReason, SequenceState
from tests.unit.helpers import entropy_varentropy, group_step, make_group, random_logits

EOS = 0


def settings(**changes) -> BeamSettings:
    values = dict(width=2, groups=1, length_penalty=1.0, gnmt=False, early_stopping="false",
                  num_return_sequences=1, diversity_penalty=0.0, max_tokens=10)
    return BeamSettings(**{**values, **changes})


def beams(width: int = 2) -> Beams:
    return Beams.start(tuple(SequenceState(f"b{i}", None, (5,), 0, frozenset({EOS}))
                             for i in range(width)))


def log_probs(*rows: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor(rows))


@pytest.mark.parametrize("alpha", [0.6, 1.0, 2.0])
def test_length_penalties_follow_hf_and_gnmt(alpha):
    assert settings(length_penalty=alpha).penalty(7) == 7 ** alpha
    assert settings(length_penalty=alpha, gnmt=True).penalty(7) == pytest.approx(
        ((5 + 7) / 6) ** alpha)


def test_first_step_expands_only_the_first_beam_and_eos_becomes_a_hypothesis():
    scores = log_probs([0.5, 0.3, 0.2], [0.5, 0.3, 0.2])  # identical rows, as at step 0
    step = advance(beams(), scores, torch.tensor([EOS]), 1, settings(), 0)
    assert step.parents == [0, 0]  # the second beam starts at -1e9
    assert step.tokens == [1, 2]  # EOS (the best) finished instead of running
    assert step.beams.scores.tolist() == pytest.approx([math.log(0.3), math.log(0.2)])
    slot = step.beams.slots[0]
    assert slot.token_ids == (EOS,) and slot.finish_reason is FinishReason.STOP
    assert float(step.beams.slot_scores[0]) == pytest.approx(math.log(0.5) / 1)
    assert bool(step.beams.slot_finished[0]) and not bool(step.beams.slot_finished[1])
    assert float(step.beams.slot_scores[1]) == NEG
    assert not step.beams.done  # a slot is still empty


def test_reaching_max_tokens_finishes_the_best_candidates_with_length():
    scores = log_probs([0.1, 0.6, 0.3], [0.1, 0.6, 0.3])
    step = advance(beams(), scores, torch.tensor([EOS]), 1, settings(max_tokens=1), 0)
    assert step.beams.done
    assert [s.token_ids for s in step.beams.slots] == [(1,), (2,)]
    assert [s.finish_reason for s in step.beams.slots] == [FinishReason.LENGTH] * 2


def test_early_stopping_true_ends_once_every_slot_is_filled():
    scores = log_probs([0.4, 0.35, 0.25], [0.4, 0.35, 0.25])
    first = advance(beams(), scores, torch.tensor([EOS]), 1,
                    settings(early_stopping="true"), 0).beams
    assert not first.done
    second = advance(first, log_probs([0.9, 0.05, 0.05], [0.9, 0.05, 0.05]),
                     torch.tensor([EOS]), 2, settings(early_stopping="true"), 0).beams
    assert bool(second.slot_finished.all()) and second.done


# -- a group's answers and histories --------------------------------------------------------------

VOCAB = 40
PROMPT = (5, 6)
STEPS = 4


def beam_spec(chain: list, **beam) -> dict:
    return {"chain": chain, "select": {"beam": {"width": 2, **beam}},
            "defaults": {"max_tokens": STEPS, "logprobs": 3}}


def ranked_values(running, logits: torch.Tensor, penalty: float, diversity: float, size: int,
                  chosen: list[int]) -> torch.Tensor:
    """What each running row's tokens were ranked by, recomputed as Hugging Face does: the
    repetition penalty (over prompt and output) on log_softmax(logits), then, on the rows of a
    beam group after the first, diversity × (how often the earlier groups' rows chose t now:
    `chosen`, the step's tokens in row order)."""
    values = torch.log_softmax(logits, dim=-1)
    for row, hypothesis in enumerate(running):
        for token in set(PROMPT) | set(hypothesis.token_ids):
            value = values[row, token]
            values[row, token] = value * penalty if value <= 0 else value / penalty
    for row in range(size, values.shape[0]):
        for token in chosen[:row // size * size]:
            values[row, token] -= diversity
    return values


@pytest.mark.parametrize("penalty, width, groups, diversity", [
    (1.0, 2, 1, 0.0), (1.5, 2, 1, 0.0), (1.3, 4, 2, 0.7)],
    ids=["no-chain", "repetition-penalty", "diverse"])
def test_processed_logprobs_are_what_each_beam_score_added(penalty, width, groups, diversity):
    """A beam reports its token's value in its parent row's processed log-probabilities (the
    chain on log_softmax, less the diversity penalty, not renormalised: Hugging Face's
    `scores`), their 3 best and the statistics of their softmax; a running beam's new score
    is its parent's plus that value, in float32."""
    group = make_group(beam_spec([{"repetition_penalty": {"penalty": penalty}}], width=width,
                                 groups=groups, diversity_penalty=diversity), PROMPT, eos=())
    size, penalised = width // groups, 0
    for step in range(STEPS):
        running = group.running()
        logits = random_logits(step, group.running_rows, VOCAB)
        logits[:, 7] = logits.amax(dim=1) + 1.0  # every row's favourite: a later group pays
        rows = group_step(group, logits, processed_logprobs=True).rows
        chosen = [r.token_id for r in rows]
        values = ranked_values(running, logits, penalty, diversity, size, chosen)
        penalised += sum(t in chosen[:size] for r in rows if r.parent >= size
                         for t, _ in r.processed_top_logprobs)
        for row in rows:
            expected = values[row.parent]
            assert row.processed_logprob == pytest.approx(float(expected[row.token_id]),
                                                          rel=1e-6, abs=1e-6)
            best = torch.topk(expected, 3)
            assert [t for t, _ in row.processed_top_logprobs] == best.indices.tolist()
            assert [v for _, v in row.processed_top_logprobs] == pytest.approx(
                best.values.tolist(), rel=1e-6, abs=1e-6)
            assert row.processed_stats == pytest.approx(entropy_varentropy(expected),
                                                        rel=1e-5, abs=1e-5)
            if not row.finished:  # the last step's rows all hit max_tokens (score - 1e9)
                parent_score = torch.tensor(running[row.parent].score, dtype=torch.float32)
                assert row.score == float(parent_score + torch.tensor(row.processed_logprob))
    assert group.finished
    assert penalised or not diversity


def test_processed_logprobs_only_when_asked():
    group = make_group(beam_spec([]), PROMPT, eos=())
    for row in group_step(group, random_logits(0, 2, VOCAB)).rows:
        assert (row.processed_logprob, row.processed_top_logprobs, row.processed_stats) == (
            None, (), None)


def test_rows_and_hypotheses_keep_the_raw_statistics_of_each_token():
    """A running beam's history is its parent's plus the parent row's raw (entropy,
    varentropy), which every row continuing it reports; a hypothesis that finishes from a
    row (EOS near the top at step 1, so some do early) keeps that row's history plus the
    row's statistics at the step it finished, though no running row continues it."""
    group = make_group(beam_spec([], width=3, num_return_sequences=3), PROMPT, eos=(0,))
    histories: list[list[tuple[float, float]]] = [[]] * 3
    known = set()
    for step in range(STEPS):
        logits = random_logits(step, group.running_rows, VOCAB)
        if step == 1:
            logits[:, 0] = logits.amax(dim=1) - 0.2
        stats = [entropy_varentropy(row) for row in logits]
        rows = group_step(group, logits).rows
        for row in rows:
            assert (row.entropy, row.varentropy) == pytest.approx(stats[row.parent], rel=1e-5)
        for hypothesis in group.hypotheses():
            if hypothesis.token_ids not in known:  # finished at this step, from row `branch`
                known.add(hypothesis.token_ids)
                expected = histories[hypothesis.branch] + [stats[hypothesis.branch]]
                assert len(hypothesis.entropies) == len(hypothesis.token_ids) == step + 1
                assert list(hypothesis.entropies) == pytest.approx([h for h, _ in expected],
                                                                   rel=1e-5)
                assert list(hypothesis.varentropies) == pytest.approx([v for _, v in expected],
                                                                      rel=1e-5)
        histories = [histories[row.parent] + [(row.entropy, row.varentropy)] for row in rows]
        for hypothesis, history in zip(group.running(), histories):
            assert list(zip(hypothesis.entropies, hypothesis.varentropies)) == history
            assert len(hypothesis.entropies) == len(hypothesis.token_ids)
    assert group.finished and {h.token_ids for h in group.hypotheses()} <= known
    assert any(len(ids) < STEPS for ids in known)  # a hypothesis ended by an early EOS
