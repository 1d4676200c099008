"""sampler_client.hf.SidecarLogitsProcessor without a model: a real server, and the calls
Hugging Face's `generate` makes (input_ids [B, T] growing by the chosen column, scores
[B, V]) made by hand, with logits whose argmax is known. What is checked: the answer is one
-inf / 0 row per input row at the sidecar's token; sequences are created once per generation
(prompts less their left padding) and released when every row finished, at max_new_tokens,
when the next generation starts, or on close; a row generate ended itself is not stepped
again; a token other than the sidecar's, and log-softmaxed (beam search) scores, are refused."""
from __future__ import annotations

import pytest
import torch

from sampler_client import hf

VOCAB = 16
EOS, PAD = 2, 0


def scores(*best: int) -> torch.Tensor:
    """[len(best), VOCAB] logits whose row i has its argmax at best[i]."""
    values = torch.zeros(len(best), VOCAB)
    values[torch.arange(len(best)), torch.tensor(best)] = 5.0
    return values


def chosen(answer: torch.Tensor) -> list[int]:
    """The token each row of a processor's answer allows; checks the rest is -inf."""
    assert torch.isneginf(answer).sum(dim=1).tolist() == [VOCAB - 1] * answer.shape[0]
    return answer.argmax(dim=1).tolist()


def grown(input_ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """input_ids [B, T] -> [B, T + 1], as generate appends its selection."""
    return torch.cat([input_ids, torch.tensor(tokens)[:, None]], dim=1)


def live(server) -> int:
    return len(server.core.store)


@pytest.fixture
def proc(client):
    with hf.SidecarLogitsProcessor(client, policy="greedy", eos_token_id=EOS,
                                   pad_token_id=PAD) as processor:
        yield processor


def test_each_row_gets_the_sidecars_token_and_its_own_unpadded_sequence(proc, client, server):
    input_ids = torch.tensor([[PAD, PAD, 5, 6], [7, 8, 9, 10]])
    assert chosen(proc(input_ids, scores(3, 4))) == [3, 4]
    assert [client.get_sequence(h).prompt_ids for h in proc.handles] == [[5, 6], [7, 8, 9, 10]]
    input_ids = grown(input_ids, [3, 4])
    assert chosen(proc(input_ids, scores(11, 12))) == [11, 12]
    assert [client.get_sequence(h).output_ids for h in proc.handles] == [[3, 11], [4, 12]]
    assert live(server) == 2
    proc.close()
    assert live(server) == 0 and proc.handles == []


def test_finished_rows_get_eos_and_are_not_stepped_then_all_are_released(proc, server):
    input_ids = torch.tensor([[5, 6], [7, 8]])
    assert chosen(proc(input_ids, scores(EOS, 4))) == [EOS, 4]
    assert proc.stopping_criteria()(grown(input_ids, [EOS, 4]), None).tolist() == [True, False]
    first = proc.handles[0]
    input_ids = grown(input_ids, [PAD, 4])  # generate padded the row it ended
    assert chosen(proc(input_ids, scores(9, 13))) == [EOS, 13]
    assert first.next_step == 1  # not stepped again
    assert chosen(proc(grown(input_ids, [PAD, 13]), scores(9, EOS))) == [EOS, EOS]
    assert live(server) == 0  # every row finished


def test_sequences_are_released_at_max_new_tokens_and_eos_fills_any_later_call(client, server):
    proc = hf.SidecarLogitsProcessor(client, policy="greedy", eos_token_id=EOS, max_new_tokens=2)
    input_ids = torch.tensor([[5, 6]])
    assert chosen(proc(input_ids, scores(7))) == [7]
    assert live(server) == 1
    input_ids = grown(input_ids, [7])
    assert chosen(proc(input_ids, scores(8))) == [8]
    assert live(server) == 0
    assert chosen(proc(grown(input_ids, [8]), scores(9))) == [EOS]  # e.g. generate on mps


def test_a_new_generation_releases_the_last_one(proc, server):
    proc(torch.tensor([[5, 6]]), scores(7))
    before = proc.handles[0].sequence_id
    proc(torch.tensor([[1, 5, 6, 7]]), scores(7))  # not [5, 6, 7]: another generate call
    assert live(server) == 1 and proc.handles[0].sequence_id != before


def test_a_prompt_extending_a_generation_that_ended_starts_a_new_one(proc, client, server):
    proc(torch.tensor([[5, 6]]), scores(EOS))
    assert live(server) == 0  # its one row finished
    assert chosen(proc(torch.tensor([[5, 6, 9]]), scores(4))) == [4]  # 9, not EOS: no error
    assert client.get_sequence(proc.handles[0]).prompt_ids == [5, 6, 9]


def test_a_row_generate_ended_itself_is_not_stepped_again(proc):
    input_ids = torch.tensor([[5, 6], [7, 8]])
    proc(input_ids, scores(3, 4))
    input_ids = grown(input_ids, [PAD, 4])  # its own stopping criterion ended row 0: padded
    assert chosen(proc(input_ids, scores(9, 10))) == [EOS, 10]
    assert proc.handles[0].next_step == 1 and proc.handles[1].next_step == 2


def test_another_token_than_the_sidecars_is_refused_and_releases(proc, server):
    input_ids = torch.tensor([[5, 6], [7, 8]])
    proc(input_ids, scores(3, 4))
    with pytest.raises(ValueError, match=r"row 1 took token 9, but the sidecar chose 4.*close"):
        proc(grown(input_ids, [3, 9]), scores(1, 1))
    assert live(server) == 0


def test_beam_search_scores_are_refused_before_anything_is_created(proc, server):
    log_probs = torch.log_softmax(scores(3, 3), dim=-1)  # generate's beam search passes these
    with pytest.raises(ValueError, match=r"beam search.*hf\.generate"):
        proc(torch.tensor([[5, 6], [5, 6]]), log_probs)
    assert live(server) == 0


def test_the_constructor_refuses_beams_and_a_missing_eos(client):
    with pytest.raises(ValueError, match="beam search"):
        hf.SidecarLogitsProcessor(client, eos_token_id=EOS, num_beams=4)
    with pytest.raises(ValueError, match="eos_token_id"):
        hf.SidecarLogitsProcessor(client)


def test_seeds_follow_rows_as_in_hf_generate(client):
    with hf.SidecarLogitsProcessor(client, policy="creative", seed=40,
                                   eos_token_id=EOS) as proc:
        proc(torch.tensor([[5, 6], [7, 8], [9, 10]]), scores(1, 1, 1))
        assert [h.seed for h in proc.handles] == [40, 41, 42]
