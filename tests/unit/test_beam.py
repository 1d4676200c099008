"""Beam search's step (`advance`) on hand-made log-probabilities."""
from __future__ import annotations

import math

import pytest
import torch

from sampler_service.groups.beam import NEG, BeamSettings, Beams, advance
from sampler_service.state import FinishReason, SequenceState

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
