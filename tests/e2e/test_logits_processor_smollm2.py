"""End to end on SmolLM2-135M-Instruct: Hugging Face's own `model.generate` with
`hf.SidecarLogitsProcessor` chooses, token for token, what `hf.generate` chooses through the
sidecar: greedy, seeded sampling, with a streamer, a left-padded batch, rows the sidecar ends
for another reason than EOS; beam search is refused before anything is created."""
from __future__ import annotations

import pytest
import torch

from sampler_client import hf

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
MAX_NEW_TOKENS = 14
SAMPLED = dict(policy="creative", params={"temperature": 0.8}, seed=7)


def generated(model, input_ids: torch.Tensor, proc, *, attention_mask=None, criteria=False,
              max_new_tokens: int = MAX_NEW_TOKENS, do_sample: bool = False,
              **options) -> list[list[int]]:
    """`model.generate` with `proc` (and its stopping criteria with `criteria`): the new
    tokens of each row [B][<= max_new_tokens], generate's padding after a finished row cut."""
    out = model.generate(input_ids, attention_mask=attention_mask, do_sample=do_sample,
                         max_new_tokens=max_new_tokens, logits_processor=[proc],
                         stopping_criteria=[proc.stopping_criteria()] if criteria else None,
                         pad_token_id=model.generation_config.pad_token_id, **options)
    return [unpadded(row, hf.eos_token_ids(model)) for row in out[:, input_ids.shape[1]:].tolist()]


def unpadded(row: list[int], eos: list[int]) -> list[int]:
    """`row` up to its first EOS (kept), as hf.generate returns a sequence."""
    ends = [i for i, token in enumerate(row) if token in eos]
    return row[:ends[0] + 1] if ends else row


def live_sequences(server) -> int:
    return len(server.core.store)


@pytest.mark.e2e
@pytest.mark.parametrize("prompt, options", [(PROMPTS[0], dict(policy="greedy")),
                                             (PROMPTS[1], SAMPLED)], ids=["greedy", "sampled"])
def test_generate_with_the_processor_equals_hf_generate_through_the_sidecar(
        smollm2, server, client, prompt, options):
    """Greedy ends on EOS after 8 tokens, the sampled run at max_new_tokens: both release.
    generate's own sampling (do_sample=True, its warpers after the processor) takes the
    same tokens, and the processor serves the second generate call as a new generation."""
    pytest.importorskip("transformers")
    model, tokenizer = smollm2
    input_ids = hf.chat_ids(tokenizer, prompt)
    expected = hf.generate(model, input_ids, client, max_new_tokens=MAX_NEW_TOKENS, **options)
    proc = hf.SidecarLogitsProcessor(client, eos_token_id=hf.eos_token_ids(model),
                                     max_new_tokens=MAX_NEW_TOKENS, **options)
    assert generated(model, input_ids, proc) == expected
    assert live_sequences(server) == 0  # released when the row finished or at max_new_tokens
    assert generated(model, input_ids, proc, do_sample=True, temperature=0.5, top_k=5) == expected


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["TextIteratorStreamer", "TextStreamer"])
def test_a_streamer_streams_the_sidecars_tokens(smollm2, server, client, capsys, kind):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = smollm2
    input_ids = hf.chat_ids(tokenizer, PROMPTS[1])
    streamer = getattr(transformers, kind)(tokenizer, skip_prompt=True, skip_special_tokens=True)
    capsys.readouterr()
    with hf.SidecarLogitsProcessor(client, policy="greedy", tokenizer=tokenizer) as proc:
        tokens = generated(model, input_ids, proc, streamer=streamer)[0]
    assert live_sequences(server) == 0  # leaving the block released it
    expected = hf.generate(model, input_ids, client, policy="greedy",
                           max_new_tokens=MAX_NEW_TOKENS)
    assert [tokens] == expected
    text = "".join(streamer) if kind == "TextIteratorStreamer" else capsys.readouterr().out
    assert text.strip() == tokenizer.decode(tokens, skip_special_tokens=True).strip()


@pytest.mark.e2e
def test_a_left_padded_batch_gives_each_row_its_own_sequence(smollm2, server, client):
    """Two prompts of different lengths, left-padded: the processor strips the padding from
    each row's prompt and seeds row i with seed + i, as hf.generate does prompt i."""
    pytest.importorskip("transformers")
    model, tokenizer = smollm2
    prompts = [hf.chat_ids(tokenizer, p)[0].tolist() for p in ("Hi!", PROMPTS[1])]
    pad = model.generation_config.pad_token_id
    input_ids, mask = hf._left_padded(prompts, pad)  # [2, T], [2, T]
    assert input_ids[0, 0] == pad and len(prompts[0]) != len(prompts[1])
    expected = hf.generate(model, prompts, client, max_new_tokens=MAX_NEW_TOKENS, **SAMPLED)
    proc = hf.SidecarLogitsProcessor(client, eos_token_id=hf.eos_token_ids(model),
                                     pad_token_id=pad, max_new_tokens=MAX_NEW_TOKENS, **SAMPLED)
    assert generated(model, input_ids, proc, attention_mask=mask, criteria=True) == expected
    assert live_sequences(server) == 0  # released after the max_new_tokens-th token at the latest


@pytest.mark.e2e
def test_rows_the_sidecar_ends_without_eos_end_there_with_the_stopping_criteria(smollm2, client):
    """max_tokens 5 finishes the sequence at its 5th token, not an EOS: with the processor's
    stopping criteria generate ends the row there; without, the row gets one EOS more."""
    pytest.importorskip("transformers")
    model, tokenizer = smollm2
    input_ids = hf.chat_ids(tokenizer, PROMPTS[1])
    options = dict(policy="greedy", params={"max_tokens": 5})
    expected = hf.generate(model, input_ids, client, max_new_tokens=8, **options)[0]
    assert len(expected) == 5 and expected[-1] not in hf.eos_token_ids(model)
    with hf.SidecarLogitsProcessor(client, eos_token_id=hf.eos_token_ids(model), **options) as proc:
        assert generated(model, input_ids, proc, criteria=True, max_new_tokens=8) == [expected]
        assert generated(model, input_ids, proc, max_new_tokens=8) == [
            expected + [hf.eos_token_ids(model)[0]]]


@pytest.mark.e2e
def test_beam_search_is_refused_before_anything_is_created(smollm2, server, client):
    pytest.importorskip("transformers")
    model, tokenizer = smollm2
    input_ids = hf.chat_ids(tokenizer, PROMPTS[0])
    proc = hf.SidecarLogitsProcessor(client, policy="greedy", eos_token_id=hf.eos_token_ids(model))
    with pytest.raises(ValueError, match=r"hf\.generate\(.*num_beams"):
        generated(model, input_ids, proc, num_beams=2, max_new_tokens=2)
    assert live_sequences(server) == 0
    with pytest.raises(ValueError, match="beam search"):
        hf.SidecarLogitsProcessor(client, eos_token_id=2, num_beams=2)
