"""Structured outputs: a grammar decides which tokens may come next (the `structured` stage).

One request field turns it on for a sequence, without touching the model server:
`SamplingParams.structured` (gRPC: a `StructuredOutput` with one of `json_schema` (JSON
text), `json_object`, `regex`, `grammar`, `choice`), `params={"structured": {...}}` in the
Python SDK (a schema may be a dict), or a `structured` entry in a policy's chain. The sequence
needs its tokenizer (`SequenceConfig.tokenizer`, or `tokenizer=` in `hf.generate`): the
grammar is compiled against that vocabulary when the sequence is created, so every refusal
comes then, naming the field (`sequences[0].params.structured.json_schema`,
`...policy_spec.chain[0].structured.regex`, `sequences[0].tokenizer`): a schema, regex or
grammar that does not parse, a JSON Schema feature not supported, more than one kind, a
grammar that accepts no string (a rule that can never end), a grammar no token of the
vocabulary can begin, no tokenizer.

Each step masks every token the grammar does not allow (−inf), before the sampling
parameters; once the output is complete only the sequence's EOS / stop ids remain, so it ends
with finish_reason STOP. Sampling, greedy, beams, forks and CoT all work under it: each row
has its own matcher. A sequence cut by `max_tokens` may end before the grammar completes:
give it room. Engine: xgrammar (as vLLM and SGLang use it): compiled grammars are cached by
(vocabulary, kind, text), and a step costs a bitmask fill per row plus one masking pass.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

from sampler_service.errors import InvalidArgument
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.params import Param
from sampler_service.policy.processors.base import Processor, RowBatch
from sampler_service.text import grammar as grammars

if TYPE_CHECKING:
    from sampler_service.state import SequenceState

#: The structured kinds, in the order of `StructuredOutput`'s oneof.
KINDS = grammars.KINDS


def structured_of(values: Any) -> tuple[str, str] | None:
    """The (kind, canonical text) a `structured` link's values set, None when off."""
    if values["json_schema"]:
        return "json_schema", values["json_schema"]
    if values["json_object"]:
        return "json_object", ""
    if values["regex"]:
        return "regex", values["regex"]
    if values["grammar"]:
        return "grammar", values["grammar"]
    if values["choice"]:
        return "choice", json.dumps(list(values["choice"]), ensure_ascii=False)
    return None


class _Matcher:
    """A sequence's grammar matcher and how far it has read that sequence's output.

    `owner` is the sequence id it reads; `consumed` the output tokens it has accepted (the
    last of them `last`), so a copy carried into another sequence (a fork, beam or CoT branch)
    or a history it does not match is rebuilt. It only ever accepts committed tokens, so
    advancing it in place at a step that is then retried or fails leaves it correct."""

    __slots__ = ("owner", "spec", "consumed", "last", "matcher", "broken")

    def __init__(self, owner: str, spec: tuple[str, str, str, tuple[int, ...]], matcher: Any):
        self.owner, self.spec, self.matcher = owner, spec, matcher
        self.consumed, self.last, self.broken = 0, -1, False


class Structured(Processor):
    """Structured outputs: only tokens that keep the output a prefix of a string the grammar
    accepts may be produced; once the grammar is complete only the sequence's EOS / stop ids
    remain, so the sequence finishes with STOP at its EOS.

    Exactly one of the parameters is given (none: off):
    - `json_schema`: a JSON Schema (a mapping, or its JSON text; `SamplingParams.structured`
      carries JSON text). Output: one JSON value valid against it, compact (xgrammar's ", " and
      ": " separators, no other whitespace), properties in the schema's order. Supported (as
      xgrammar 0.2 supports them): `type` (object, array, string, number, integer, boolean,
      null, and lists of types), `properties`, `required`, `additionalProperties` (false by
      default: strict mode, as vLLM), `enum`, `const`, `anyOf` / `oneOf`, `allOf` of one,
      `$ref` / `$defs` (local, recursive), `items`, `prefixItems`, `minItems` / `maxItems`,
      `minLength` / `maxLength`, `pattern`, `format` (date, time, date-time, email, uuid,
      uri, ipv4, ipv6, ...), `minimum` / `maximum` / `exclusiveMinimum` /
      `exclusiveMaximum` for integers and numbers, `minProperties` / `maxProperties`.
      Not supported: `not`, `if` / `then` / `else`, `dependentSchemas`, `uniqueItems`,
      `multipleOf`, remote `$ref`; `patternProperties` partly. An unsupported keyword is
      INVALID_ARGUMENT at creation.
    - `json_object`: true: any JSON object (vLLM's JSON mode: the schema `{"type": "object"}`).
    - `regex`: the output fully matches the regular expression (xgrammar's dialect: classes,
      `\\d \\w \\s`, groups, alternation, `* + ? {m,n}`; no backreferences or lookaround).
    - `grammar`: an EBNF / GBNF grammar (llama.cpp's GBNF, in xgrammar's dialect: a `root`
      rule, `::=`, literals, character classes, `* + ? {m,n}`).
    - `choice`: a list of strings; the output is exactly one of them.

    Peer: vLLM / SGLang structured outputs (`guided_json` / `json_schema`, `guided_regex`,
    `guided_grammar`, `guided_choice`, `response_format: json_object`), on the engine they use
    by default, xgrammar: the spec is compiled against the sequence's vocabulary when the
    sequence is created (a bad schema, regex or grammar is INVALID_ARGUMENT then, naming its
    field, and so is a grammar that accepts no string or that no token can begin) and cached by (vocabulary, kind, text); a
    step only advances the matcher and fills a token bitmask, batched over the rows. Placed
    first in the flat chain, as vLLM applies its grammar bitmask before the sampling
    parameters. Ids past the vocabulary (padded logits) and special tokens other than EOS are
    masked.

    Needs the sequence's tokenizer (`SequenceConfig.tokenizer`); without EOS ids given, the
    vocabulary's are the sequence's. Constraint. Per-sequence state: the grammar matcher, with
    its owner's id and the tokens it has accepted; each step advances it by the tokens
    committed since (a retried or failed step never advances it); a branch (fork, beam, CoT)
    rebuilds its own from its tokens. A history the grammar does not accept (a resumed or
    moved sequence generated without it) leaves only the stop ids, ending the sequence.
    Off: none given.
    Sparse rows: refused unless an earlier stage excluded the tail (a grammar masks most of the
    vocabulary, so the result depends on the tail's values).
    """

    key = "structured"
    role = "constraint"
    params = (
        Param("json_schema", "json_schema", default="", off="",
              doc="a JSON schema the output must validate against"),
        Param("json_object", "bool", default=False, off=False,
              doc="the output is a JSON object (vLLM's JSON mode)"),
        Param("regex", "regex", default="", off="", doc="a regex the output must fully match"),
        Param("grammar", "grammar", default="", off="",
              doc="an EBNF / GBNF grammar (a `root` rule) the output must match"),
        Param("choice", "str_list", default=(), off=(),
              doc="the output is exactly one of these strings"),
    )
    #: The flat request parameter `structured` sets these values together, as a mapping.
    flat_group = "structured"

    @classmethod
    def check_values(cls, values: dict[str, Any], field: str) -> None:
        """At most one kind is given."""
        given = [p.name for p in cls.params if values[p.name] != p.off]
        if len(given) > 1:
            raise InvalidArgument(f"structured takes one of {', '.join(KINDS)}; got "
                                  f"{', '.join(given)}", f"{field}.{given[1]}")

    def apply(self, candidates: Candidates, args: dict[str, Any], batch: RowBatch) -> None:
        specs = [structured_of({p.name: (bool(args[p.name][r]) if p.kind == "bool"
                                         else args[p.name][r]) for p in self.params})
                 for r in range(batch.rows)]
        active = [r for r, spec in enumerate(specs) if spec is not None]
        if not active:
            return
        vocab = candidates.vocab
        words = (vocab + 31) // 32
        bitmask = torch.full((batch.rows, words), -1, dtype=torch.int32)
        memory = batch.memory(self.key, None)
        live, live_rows, dead = [], [], []
        for row in active:
            state = batch.states[row]
            if state.text is None:  # a preview: only sequences are created with a tokenizer
                raise InvalidArgument("the structured stage needs the sequence's tokenizer "
                                      "(SequenceConfig.tokenizer)", "tokenizer")
            holder = memory[row] = _advance(memory[row], state, specs[row])
            if holder.broken or holder.matcher.is_terminated():
                dead.append(row)
            else:
                live.append(holder.matcher)
                live_rows.append(row)
        batch.remember(self.key, memory)
        by_width: dict[int, list[int]] = {}  # xgrammar fills ceil(vocabulary / 32) words
        for index, row in enumerate(live_rows):
            size = batch.states[row].text.vocabulary.size
            by_width.setdefault((size + 31) // 32, []).append(index)
        for width, members in by_width.items():
            target = bitmask if width == words else torch.full((batch.rows, width), -1,
                                                                dtype=torch.int32)
            rows = [live_rows[i] for i in members]
            for index in members:  # one call each: 5 µs a row (xgrammar's BatchGrammarMatcher
                live[index].fill_next_token_bitmask(target, live_rows[index])  # is slower here)
            if target is not bitmask:
                bitmask[rows, :width] = target[rows]
        for row in active:
            size = batch.states[row].text.vocabulary.size
            if size < vocab:  # padded ids past the vocabulary
                _clear_from(bitmask, row, size)
        empty = [r for r in live_rows if not bool(bitmask[r].any())] + dead
        for row in empty:  # nothing the grammar allows: only the stop ids stay (the end)
            bitmask[row] = 0
            for token in batch.states[row].stop_ids:
                if token < vocab:
                    bitmask[row, token >> 5] |= _bit(token & 31)
        candidates.keep_bits(active, bitmask)


def _bit(index: int) -> int:
    """Bit `index` (0..31) of an int32 word, as a Python int in int32's range."""
    return -(1 << 31) if index == 31 else 1 << index


def _clear_from(bitmask: torch.Tensor, row: int, start: int) -> None:
    """Clears bits [start, 32·words) of one bitmask row."""
    word, offset = divmod(start, 32)
    if offset:
        bitmask[row, word] &= (1 << offset) - 1
        word += 1
    bitmask[row, word:] = 0


def _stop_tokens(state: "SequenceState") -> tuple[int, ...]:
    return tuple(sorted(state.stop_ids))


def _advance(holder: _Matcher | None, state: "SequenceState",
             spec: tuple[str, str]) -> _Matcher:
    """`holder` brought up to the sequence's output (a new one when it is not this
    sequence's, not for this grammar, or ahead of / off the output)."""
    vocabulary = state.text.vocabulary
    key = (vocabulary.digest, *spec, _stop_tokens(state))
    output = state.output_ids
    if (not isinstance(holder, _Matcher) or holder.owner != state.sequence_id
            or holder.spec != key or holder.consumed > len(output)
            or (holder.consumed and output[holder.consumed - 1] != holder.last)):
        xgr = grammars.xgrammar_module()
        compiled = grammars.compiled(vocabulary, *spec)
        holder = _Matcher(state.sequence_id, key,
                          xgr.GrammarMatcher(compiled, override_stop_tokens=list(key[3]) or None))
    for token in output[holder.consumed:]:
        if not holder.broken and (holder.matcher.is_terminated()
                                  or not holder.matcher.accept_token(token)):
            holder.broken = True  # a token after the end, or one the grammar refuses
        holder.consumed += 1
        holder.last = token
    return holder


__all__ = ["KINDS", "Structured", "structured_of"]
