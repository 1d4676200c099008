"""Constraints on which tokens may be produced at a step, and token-addressed biases.

Every processor here touches only the (row, token) pairs its parameters name (or, for
`allowed_token_ids` and `forced_tokens`, the rows that are on), through `Candidates.locate` /
`update`, so it works the same on a dense batch and on a sparse one (after a truncation, where a
token that is not listed is −inf already). Per-row parameter values (token lists, maps) are turned
into tensors once per distinct value and cached.

Token ids a parameter names must lie inside the vocabulary of the step's logits: a step whose
vocabulary is smaller fails with INVALID_ARGUMENT on `logits.shape`, as for history ids.

On sparse rows the masks are exact on sent tokens and only lower tail tokens (the tail's max
bound stays valid); `logit_bias` bounds a lifted tail token as the penalties do.
"""
from __future__ import annotations

import functools
import math
from abc import abstractmethod
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from sampler_service.errors import InvalidArgument
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import Processor, RowBatch, row_pairs
from sampler_service.policy.processors.penalties import TokenChange, TokenChangeProcessor
from sampler_service.policy.sparse import TailBound

if TYPE_CHECKING:
    from sampler_service.state import SequenceState

#: Distinct parameter values whose tensors are kept (per value kind).
_CACHE_SIZE = 4096
_EMPTY_IDS = torch.empty(0, dtype=torch.int64)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _ids(ids: tuple[int, ...]) -> torch.Tensor:
    """A token-id tuple as an int64 CPU tensor (cached; callers never modify it)."""
    return torch.tensor(ids, dtype=torch.int64) if ids else _EMPTY_IDS


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _bias(pairs: tuple[tuple[int, float], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64, biases float32) of a validated token -> bias map."""
    return (torch.tensor([t for t, _ in pairs], dtype=torch.int64),
            torch.tensor([b for _, b in pairs], dtype=torch.float32))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _step_map(pairs: tuple[tuple[int, int], ...]) -> dict[int, int]:
    return dict(pairs)


def _check_vocab(key: str, ids: torch.Tensor | int, vocab: int) -> None:
    """Token ids named by a parameter (or the largest of them) must be < vocab."""
    largest = ids if isinstance(ids, int) else int(ids.max()) if ids.numel() else -1
    if largest >= vocab:
        raise InvalidArgument(f"{key} refers to token id {largest} but the vocabulary has "
                              f"{vocab} ids", "logits.shape")


def _set(candidates: Candidates, rows: torch.Tensor, tokens: torch.Tensor, value: float) -> None:
    """Sets the (row, token) pairs to `value` where the batch lists them."""
    present, columns = candidates.locate(rows, tokens)
    candidates.update(rows[present], columns,
                      torch.full(columns.shape, value, dtype=candidates.values.dtype,
                                 device=candidates.values.device))


class MaskingProcessor(Processor):
    """A constraint that sets some (row, token) pairs to −inf (`masked`)."""

    @abstractmethod
    def masked(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, tokens) [P] of `candidates` to mask at this step, or None when none."""

    def apply(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch) -> None:
        pairs = self.masked(candidates, args, batch)
        if pairs is not None:
            _set(candidates, *pairs, -math.inf)

    def sparse_tail(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch,
                    tail: TailBound) -> bool:
        """Exact: masking only lowers, so the tail's max bound stays valid."""
        pairs = self.masked(candidates, args, batch)
        if pairs is not None:
            tail.mask(*pairs)
        return True


def _tail(state: "SequenceState", k: int) -> tuple[int, ...] | None:
    """The last k ids of prompt + output (None when it holds fewer), without copying the rest."""
    output = state.output_ids
    if k <= len(output):
        return tuple(output[len(output) - k:])
    prompt, need = state.prompt_ids, k - len(output)
    if need > len(prompt):
        return None
    return tuple(prompt[len(prompt) - need:]) + tuple(output)


class MinTokens(MaskingProcessor):
    """Masks the sequence's EOS and stop ids to −inf while fewer than `min_tokens` were generated.

    Peer: vLLM `min_tokens` (Hugging Face `MinNewTokensLengthLogitsProcessor`). The stop set is
    the sequence's `eos_token_ids` ∪ `stop_token_ids`, with EOS even under `ignore_eos` (vLLM
    masks its `all_stop_token_ids`, which keep the model's EOS). Constraint; reads the output
    length.
    Off: min_tokens = 0.
    Sparse rows: exact; masking a tail token leaves the tail's max bound valid.
    """

    key = "min_tokens"
    role = "constraint"
    params = (Param("min_tokens", "int", default=0, off=0, minimum=0,
                    doc="tokens generated before EOS / stop ids are allowed"),)
    flat_names = {"min_tokens": "min_tokens"}

    def masked(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        active = batch.positions < args["min_tokens"]
        if not bool(active.any()):
            return None
        rows, tokens = batch.stop_token_pairs()
        on = active[rows]
        return rows[on], tokens[on]


class LogitBias(TokenChangeProcessor):
    """Adds a bias to the logits of given token ids: l'_t = l_t + bias[t].

    Peer: vLLM / OpenAI `logit_bias` (vLLM v1 `LogitBiasLogitsProcessor`). Keys are token ids,
    or their decimal text as OpenAI's JSON sends them (`{"50256": -100}`; vLLM converts them
    with `int(token)`). Biases lie in [−100, 100] as in the OpenAI API; vLLM's
    `SamplingParams.from_optional` (its OpenAI server's path) clamps a bias to that range with
    `min(100.0, max(-100.0, bias))`, so inside it the two agree exactly, and here a value
    outside it is refused (INVALID_ARGUMENT naming the entry) rather than silently changed.
    −100 in practice bans a token, +100 in practice forces it; a token already at −inf stays
    there. Transform; keeps no per-sequence state.
    Off: an empty map.
    Sparse rows: exact; a positive bias on a tail token lifts the tail's max bound by it.
    """

    key = "logit_bias"
    role = "transform"
    params = (Param("bias", "token_bias", default=(), off=(), minimum=-100.0, maximum=100.0,
                    doc="token id -> value added to its logit"),)
    flat_names = {"bias": "logit_bias"}

    def change(self, candidates: Candidates, args: dict[str, Any],
               batch: RowBatch) -> TokenChange | None:
        biases = args["bias"]
        if not any(biases):
            return None
        per_row = [_bias(b) if b else (_EMPTY_IDS, torch.empty(0)) for b in biases]
        rows, tokens = row_pairs([ids for ids, _ in per_row], batch.device)
        _check_vocab(self.key, tokens, candidates.vocab)
        values = torch.cat([b for _, b in per_row]).to(batch.device)
        return TokenChange(rows, tokens, values, lambda v, _, bias: v + bias, values > 0)


class AllowedTokenIds(Processor):
    """Only the listed token ids may be produced: every other token's logit becomes −inf.

    Peer: vLLM `allowed_token_ids` (a mask applied before everything else in vLLM v1). Listed ids
    keep their logits; a listed id that an earlier stage masked stays masked. Constraint; keeps
    no per-sequence state. Off: an empty list (every token allowed).
    Sparse rows: exact; a row whose every listed id was sent excludes its tail, the others
    keep only the listed tail ids (the tail's max bound stays valid).
    """

    key = "allowed_token_ids"
    role = "constraint"
    params = (Param("ids", "int_list", default=(), off=(),
                    doc="the only token ids that may be produced; empty = all"),)
    flat_names = {"ids": "allowed_token_ids"}

    def _listed(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows that are on [A], (row, token) pairs listed [P] each)."""
        allowed = args["ids"]
        rows, tokens = row_pairs([_ids(ids) for ids in allowed], batch.device)
        _check_vocab(self.key, tokens, candidates.vocab)
        active = torch.tensor([r for r, ids in enumerate(allowed) if ids], device=batch.device)
        return active, rows, tokens

    def apply(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch) -> None:
        if any(args["ids"]):
            candidates.keep_only(*self._listed(candidates, args, batch))

    def sparse_tail(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch,
                    tail: TailBound) -> bool:
        """The tail keeps the listed ids it holds (none: it is excluded)."""
        if any(args["ids"]):
            active, rows, tokens = self._listed(candidates, args, batch)
            sent, _ = tail.sparse.find(rows, tokens)
            tail.restrict(tail.rows_mask(active), tail.rows_mask(rows[~sent]))
        return True


class BadWords(MaskingProcessor):
    """Bans token-id sequences: a sequence's last id gets −inf when the text would complete it.

    Peer: Hugging Face `NoBadWordsLogitsProcessor`, exactly: a one-token sequence is always
    banned, except one that is an EOS id of the sequence (HF drops those so that generation can
    end); for a longer sequence, its last id is banned when prompt + output ends with the rest
    of it. Like HF (whose `input_ids` include the prompt) the match may reach into the prompt;
    vLLM v1 matches against the generated tokens only, which differs only while the output is
    shorter than the sequence. A word given as text (vLLM `bad_words`, with the sequence's
    tokenizer) becomes vLLM's sequences: the word without leading whitespace, encoded, and
    " " + word encoded when that differs in its first id but not in length; encoded when the
    sequence is created (cached). Constraint; reads the last len(sequence) − 1 ids of the
    history, no per-sequence state. Off: an empty list.
    Sparse rows: exact; masking a tail token leaves the tail's max bound valid.
    """

    key = "bad_words"
    role = "constraint"
    params = (Param("sequences", "int_lists", default=(), off=(), text_rule="bad_words",
                    doc="token-id sequences that must not be produced, or words (vLLM's "
                        "`bad_words`: each banned as encoded alone and after a space)"),)
    flat_names = {"sequences": "bad_words"}

    def masked(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        sequences = args["sequences"]
        if not any(sequences):
            return None
        per_row = []
        largest = -1
        for row, (state, words) in enumerate(zip(batch.states, sequences)):
            banned: list[int] = []
            if words:
                words = batch.token_sequences(row, "bad_words", words, "bad_words.sequences")
                singles, longer, top = _bad_words_plan(words)
                largest = max(largest, top)
                banned.extend(t for t in singles if t not in state.eos_token_ids)
                for prefix, last in longer:
                    if _tail(state, len(prefix)) == prefix:
                        banned.append(last)
            per_row.append(torch.tensor(banned, dtype=torch.int64) if banned else _EMPTY_IDS)
        _check_vocab(self.key, largest, candidates.vocab)
        if not any(len(ids) for ids in per_row):
            return None
        return row_pairs(per_row, batch.device)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _bad_words_plan(words: tuple[tuple[int, ...], ...]
                    ) -> tuple[tuple[int, ...], tuple[tuple[tuple[int, ...], int], ...], int]:
    """(one-token sequences, (prefix, last id) of the longer ones, the largest id)."""
    return (tuple(w[0] for w in words if len(w) == 1),
            tuple((w[:-1], w[-1]) for w in words if len(w) > 1),
            max(t for w in words for t in w))


class _NGramIndex(NamedTuple):
    """Per-sequence state of `no_repeat_ngram`: every (n−1)-gram of the first `length` ids of
    prompt + output -> the ids that followed it. `owner` and `size` tell whether it is this
    sequence's index (a copy carried into another sequence is rebuilt)."""

    owner: str
    size: int
    length: int
    table: dict[tuple[int, ...], set[int]]


class NoRepeatNGram(MaskingProcessor):
    """Bans every token that would complete an n-gram already present in prompt + output.

    With n = `size` and h = prompt + output, token t gets −inf when (h[−n+1:], t) occurs in h.
    size 1 bans every id seen so far. Peer: Hugging Face `NoRepeatNGramLogitsProcessor`
    (`no_repeat_ngram_size`), whose `input_ids` include the prompt for decoder-only models.
    Constraint. Per-sequence state: an index (n−1)-gram -> following ids, extended by the new
    ids at each step (O(n) per step), stored only when the step is accepted; a missing or stale
    index (a new, previewed or copied sequence) is rebuilt from the history. Off: size = 0.
    Sparse rows: exact; masking a tail token leaves the tail's max bound valid.
    """

    key = "no_repeat_ngram"
    role = "constraint"
    params = (Param("size", "int", default=0, off=0, minimum=0, maximum=1024,
                    doc="n: an n-gram of prompt + output may occur only once; 0 = off (the "
                        "index grows with n, so n is capped)"),)

    def masked(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The banned pairs; the rows' extended indexes are remembered (the same ones however
        often this runs in a step)."""
        size = args["size"]
        if not bool((size > 0).any()):
            return None
        memory = batch.memory(self.key, None)
        rows: list[int] = []
        tokens: list[int] = []
        for row, (state, n) in enumerate(zip(batch.states, size.tolist())):
            if n == 0:
                continue
            index = memory[row] = _extend(memory[row], state, n)
            banned = index.table.get(_tail(state, n - 1), ())
            rows.extend([row] * len(banned))
            tokens.extend(banned)
        batch.remember(self.key, memory)
        if not rows:
            return None
        return (torch.tensor(rows, dtype=torch.int64, device=batch.device),
                torch.tensor(tokens, dtype=torch.int64, device=batch.device))


def _extend(index: _NGramIndex | None, state: "SequenceState", n: int) -> _NGramIndex:
    """`index` brought up to the whole history of `state` (rebuilt when it is not its own).

    The table grows in place: it only ever gains n-grams of the true history, so a step that is
    computed but never accepted (a retry, a failed step, a preview) leaves it correct."""
    prompt, output = state.prompt_ids, state.output_ids
    total = len(prompt) + len(output)
    if (not isinstance(index, _NGramIndex) or index.owner != state.sequence_id
            or index.size != n or index.length > total):
        index = _NGramIndex(state.sequence_id, n, 0, {})
    if index.length == total:
        return index
    begin = max(0, index.length - n + 1)  # the n-grams ending at a new id start here or later
    recent = (tuple(prompt[begin:]) + tuple(output) if begin < len(prompt)
              else tuple(output[begin - len(prompt):]))
    table = index.table
    for gram in zip(*(recent[i:] for i in range(n))):
        table.setdefault(gram[:-1], set()).add(gram[-1])
    return index._replace(length=total)


class ExponentialDecayLengthPenalty(Processor):
    """Raises the EOS logits exponentially once `start` tokens were generated.

    At output position n > start, for each EOS id e with a finite logit:
    l'_e = l_e + |l_e| · (factor^(n − start) − 1). Peer: Hugging Face
    `ExponentialDecayLengthPenalty` as installed (transformers 5.x), which uses |l_e| so that a
    negative EOS logit grows too (older versions multiplied l_e itself). EOS = the sequence's
    `eos_token_ids` (not its stop ids); a −inf EOS logit stays −inf. factor < 1 lowers the EOS
    logits instead. factor is float32 like every float parameter. Where HF overflows
    (factor^(n − start) beyond float32) the boost and the logit saturate at the largest float32:
    the EOS becomes certain where HF's row turns +inf or NaN (an EOS logit of 0 stays 0).
    Transform; reads the output length, keeps no per-sequence state.
    Off: factor = 1.0 (start then does nothing).
    Sparse rows: no rule (|l| makes the boost of a tail EOS unbounded): exact only once an
    earlier truncation excluded the tail.
    """

    key = "exponential_decay_length_penalty"
    role = "transform"
    params = (Param("start", "int", default=0, off=0, minimum=0,
                    doc="output tokens generated before the EOS boost starts"),
              Param("factor", "float", default=1.0, off=1.0, minimum=0.0, exclusive_minimum=True,
                    doc="growth per token after start; 1 = off, > 1 favours ending"))

    def apply(self, candidates: Candidates, args: dict[str, torch.Tensor], batch: RowBatch) -> None:
        factor, start = args["factor"], args["start"]
        exponent = batch.positions - start
        active = (factor != 1.0) & (exponent > 0)
        if not bool(active.any()):
            return
        # factor^k − 1 in float64, then float32 (HF: Python float pow, then a float32 product);
        # capped at the largest float32 so that an EOS logit of 0 stays 0 instead of NaN.
        largest = torch.finfo(candidates.values.dtype).max
        growth = (factor.double().pow(exponent.clamp(min=0).double()) - 1.0).float().clamp(
            max=largest)
        rows, tokens = row_pairs([_ids(tuple(sorted(s.eos_token_ids))) for s in batch.states],
                              batch.device)
        on = active[rows]
        rows, tokens = rows[on], tokens[on]
        _check_vocab(self.key, tokens, candidates.vocab)
        present, columns = candidates.locate(rows, tokens)
        rows = rows[present]
        values = candidates.values[rows, columns]
        finite = torch.isfinite(values)
        rows, columns, values = rows[finite], columns[finite], values[finite]
        boosted = values + values.abs() * growth[rows]
        candidates.update(rows, columns, boosted.clamp(max=largest))


class SuppressTokens(MaskingProcessor):
    """Masks the listed ids to −inf at the listed output positions.

    Peer: Hugging Face `SuppressTokensAtBeginLogitsProcessor` (`begin_suppress_tokens`, which
    acts at the first generated position only), generalised to any set of positions: the
    default steps = [0] is HF's behaviour. Constraint; reads the output position, keeps no
    per-sequence state. Off: ids = [] (or steps = []).
    Sparse rows: exact; masking a tail token leaves the tail's max bound valid.
    """

    key = "suppress_tokens"
    role = "constraint"
    params = (Param("ids", "int_list", default=(), off=(), doc="token ids to mask"),
              Param("steps", "int_list", default=(0,), off=(), range_doc="output positions >= 0",
                    doc="output positions (0 = the first generated token) where they are masked"))

    def masked(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        per_row = [_ids(ids) if ids and state.position in steps else _EMPTY_IDS
                   for state, ids, steps in zip(batch.states, args["ids"], args["steps"])]
        if not any(len(ids) for ids in per_row):
            return None
        rows, tokens = row_pairs(per_row, batch.device)
        _check_vocab(self.key, tokens, candidates.vocab)
        return rows, tokens


class ForcedTokens(Processor):
    """Forces a token at given output positions: every other logit becomes −inf, and the forced
    token's logit becomes 0 (probability 1).

    Peer: Hugging Face `ForceTokensLogitsProcessor` (`forced_decoder_ids`, since removed from
    transformers), keyed by output position rather than by the length of `input_ids`. As in
    HF the forced token is set to 0 even where an earlier stage masked it (a sparse batch gets
    it back). A later stage may still mask it. Constraint; reads the output position, keeps no
    per-sequence state. Off: an empty map.
    Sparse rows: a forced row excludes its tail; its token must be sent (its raw logprob is
    reported).
    """

    key = "forced_tokens"
    role = "constraint"
    params = (Param("tokens", "int_map", default=(), off=(), minimum=0,
                    doc="output position -> the token id forced there"),)

    def _forced(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows [F], their forced tokens [F]) at this step, or None."""
        forced_rows: list[int] = []
        forced: list[int] = []
        for row, (state, pairs) in enumerate(zip(batch.states, args["tokens"])):
            token = _step_map(pairs).get(state.position) if pairs else None
            if token is not None:
                forced_rows.append(row)
                forced.append(token)
        if not forced_rows:
            return None
        rows = torch.tensor(forced_rows, dtype=torch.int64, device=batch.device)
        tokens = torch.tensor(forced, dtype=torch.int64, device=batch.device)
        _check_vocab(self.key, tokens, candidates.vocab)
        return rows, tokens

    def apply(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch) -> None:
        forced = self._forced(candidates, args, batch)
        if forced is not None:
            candidates.force(*forced)

    def sparse_tail(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch,
                    tail: TailBound) -> bool:
        """Forcing keeps one token: the tail is excluded. A forced token that was not sent
        is chosen without its raw logit, which every choice reports: refused."""
        forced = self._forced(candidates, args, batch)
        if forced is None:
            return True
        rows, tokens = forced
        sent, _ = tail.sparse.find(rows, tokens)
        token = dict(zip(rows.tolist(), tokens.tolist()))
        tail.refuse(tail.rows_mask(rows[~sent]), lambda r: (
            f"forced_tokens: the forced token {token[r]} is not among the K sent entries (its "
            "raw logprob is reported)"), structural=False)
        tail.exclude(tail.rows_mask(rows))
        return True
