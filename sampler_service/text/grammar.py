"""Structured-output grammars on xgrammar: parsing (vocabulary-free, when a spec is validated)
and compilation against a vocabulary (when a sequence is created), both cached by content.

A structured output is a (kind, text) pair, canonical so equal constraints share one entry:
- `json_schema`: the schema as compact JSON text (key order kept: it is the order of the
  properties the grammar emits);
- `json_object`: any JSON object ("" as text);
- `regex`: the pattern; `grammar`: EBNF / GBNF text (xgrammar's dialect: a `root` rule);
- `choice`: the strings as a JSON list; the grammar is their alternation.

`parsed` turns a bad schema / regex / grammar into InvalidArgument naming the field, without a
vocabulary (a policy file or a request is refused where it is written). `compiled` compiles a
grammar for a vocabulary (xgrammar's token-mask cache; 5-50 ms for a typical schema on 49k
tokens) and keeps it in an LRU keyed by (vocabulary digest, kind, text), so steps only match.
A grammar no token of the vocabulary can begin (an empty language, or bytes the vocabulary
cannot spell) is refused there too.
"""
from __future__ import annotations

import functools
import json
import re
from typing import TYPE_CHECKING, Any

from sampler_service.errors import InvalidArgument
from sampler_service.text.lru import LruCache

if TYPE_CHECKING:
    import xgrammar
    from sampler_client.vocabulary import Vocabulary

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
#: Compiled grammars kept (each holds an adaptive token-mask cache: 10 kB to a few MB).
COMPILED_CACHE_SIZE = 256
#: Vocabularies with a compiler kept (a sidecar serves one or a few models).
COMPILERS = 8
#: The longest regex / grammar / schema text accepted.
MAX_TEXT_CHARS = 1 << 20
#: Whitespace in JSON output: none beyond xgrammar's compact separators (", " and ": "), as
#: llguidance and outlines default to; xgrammar's `any_whitespace` lets a small model emit
#: whitespace until its token budget runs out.
JSON_ANY_WHITESPACE = False


def xgrammar_module():
    """xgrammar, or UNIMPLEMENTED-like INVALID_ARGUMENT when the `server` extra lacks it."""
    try:
        import xgrammar
    except ImportError:  # pragma: no cover - the server extra installs it
        raise InvalidArgument("structured outputs need xgrammar: pip install "
                              "'sampler-sidecar[server]'", "structured") from None
    return xgrammar


def _reason(exc: BaseException) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    text = str(exc).strip()
    text = re.sub(r"^\[[0-9:]+\]\s+\S+:\d+:\s*", "", text)
    return text.splitlines()[0] if text else type(exc).__name__


def choice_ebnf(choices: tuple[str, ...]) -> str:
    """The EBNF of an alternation of literal strings (JSON string escapes are xgrammar's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _grammar(kind: str, text: str) -> "xgrammar.Grammar":
    xgr = xgrammar_module()
    if kind == "json_schema":
        return xgr.Grammar.from_json_schema(text, any_whitespace=JSON_ANY_WHITESPACE,
                                            strict_mode=True)
    if kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}',
                                            any_whitespace=JSON_ANY_WHITESPACE, strict_mode=False)
    if kind == "regex":
        return xgr.Grammar.from_regex(text)
    if kind == "grammar":
        return xgr.Grammar.from_ebnf(text)
    if kind == "choice":
        return xgr.Grammar.from_ebnf(choice_ebnf(tuple(json.loads(text))))
    raise ValueError(kind)


#: xgrammar's serialized grammar expressions (`Grammar.serialize_json`, format v18): type
#: codes, each followed by its data length and data.
_BYTES, _CLASS, _CLASS_STAR, _EMPTY, _RULE, _SEQUENCE, _CHOICES, _TAGS, _REPEAT = range(9)
_SERIAL_VERSIONS = ("v18",)


def endless_rules(grammar: "xgrammar.Grammar") -> list[str]:
    """When the grammar accepts no string, the names of its rules that derive no finite
    string (each alternative needs a rule that never ends), the root rule first; else [] (and
    [] when xgrammar's serialization is a version this reader does not know: no verdict).

    The least fixed point of "a rule ends when some alternative is a sequence of parts that
    all end": bytes, character classes and the empty string end; a reference ends when its
    rule does; a repeat ends when its minimum is 0 or its rule ends; a tag dispatch (a
    structural-tag construct) is taken to end."""
    data = json.loads(grammar.serialize_json())
    if data.get("__VERSION__") not in _SERIAL_VERSIONS:
        return []
    flat, starts = data["grammar_expr_data"], data["grammar_expr_indptr"]
    rules = data["rules"]

    def expr(index: int) -> tuple[int, list[int]]:
        start = starts[index]
        return flat[start], flat[start + 2:start + 2 + flat[start + 1]]

    ends = [False] * len(rules)

    def expr_ends(index: int) -> bool:
        kind, body = expr(index)
        if kind in (_BYTES, _CLASS, _CLASS_STAR, _EMPTY, _TAGS):
            return True
        if kind == _RULE:
            return ends[body[0]]
        if kind == _REPEAT:
            return body[1] == 0 or ends[body[0]]
        if kind == _SEQUENCE:
            return all(expr_ends(part) for part in body)
        if kind == _CHOICES:
            return any(expr_ends(part) for part in body)
        return True  # an expression kind this reader does not know: assume it ends

    changed = True
    while changed:
        changed = False
        for index, rule in enumerate(rules):
            if not ends[index] and expr_ends(rule[1]):
                ends[index] = changed = True
    root = data["root_rule_id"]
    if ends[root]:
        return []
    order = [root] + [index for index in range(len(rules)) if index != root]
    return [rules[index][0] for index in order if not ends[index]]


@functools.lru_cache(maxsize=COMPILED_CACHE_SIZE)
def _parsed(kind: str, text: str) -> "xgrammar.Grammar | str":
    try:
        grammar = _grammar(kind, text)
    except (RuntimeError, ValueError, TypeError) as exc:
        return _reason(exc)
    endless = endless_rules(grammar)
    if endless:
        return (f"the grammar accepts no string: rule {endless[0]!r} can never end (each of "
                f"its alternatives needs a rule that never ends: {', '.join(endless)})")
    return grammar


def parsed(kind: str, text: str, field: str) -> "xgrammar.Grammar":
    """The grammar of a canonical (kind, text), or InvalidArgument(field) with xgrammar's
    reason (cached either way)."""
    result = _parsed(kind, text)
    if isinstance(result, str):
        what = {"json_schema": "JSON schema", "regex": "regular expression",
                "grammar": "EBNF grammar", "choice": "choice", "json_object": "JSON"}[kind]
        raise InvalidArgument(f"invalid {what}: {result}", field)
    return result


def canonical_schema(value: Any, field: str) -> str:
    """A JSON schema given as a mapping or JSON text, as compact JSON text (key order kept)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidArgument(f"json_schema is not valid JSON: {exc}", field) from None
    if not isinstance(value, dict):
        raise InvalidArgument("json_schema must be a JSON object (a mapping or its JSON text)",
                              field)
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"json_schema is not plain JSON: {exc}", field) from None
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidArgument(f"json_schema has {len(text)} characters; at most "
                              f"{MAX_TEXT_CHARS}", field)
    return text


# -- compilation against a vocabulary -------------------------------------------------------------
_compilers: "LruCache[str, xgrammar.GrammarCompiler]" = LruCache(COMPILERS)
_compiled: "LruCache[tuple[str, str, str], xgrammar.CompiledGrammar]" = LruCache(
    COMPILED_CACHE_SIZE)


def tokenizer_info(vocabulary: "Vocabulary") -> "xgrammar.TokenizerInfo":
    """xgrammar's view of a vocabulary: each id's raw bytes (special tokens as b"", which
    xgrammar never lets a grammar produce), EOS ids as stop tokens."""
    xgr = xgrammar_module()
    special = vocabulary.special_ids
    encoded = [b"" if i in special else token for i, token in enumerate(vocabulary.tokens)]
    return xgr.TokenizerInfo(encoded, xgr.VocabType.RAW,
                             stop_token_ids=list(vocabulary.eos_token_ids) or None)


def _compiler(vocabulary: "Vocabulary") -> "xgrammar.GrammarCompiler":
    compiler = _compilers.get(vocabulary.digest)
    if compiler is not None:
        return compiler
    return _compilers.put(vocabulary.digest, xgrammar_module().GrammarCompiler(
        tokenizer_info(vocabulary), max_threads=8, cache_enabled=False))


def warm(vocabulary: "Vocabulary") -> None:
    """Builds the vocabulary's grammar compiler now (~130 ms for SmolLM2's 49152 tokens), when
    the vocabulary is registered, so that the first structured sequence compiles its grammar
    in a few ms; nothing without xgrammar."""
    try:
        import xgrammar  # noqa: F401
    except ImportError:  # pragma: no cover - the server extra installs it
        return
    _compiler(vocabulary)


def compiled(vocabulary: "Vocabulary", kind: str, text: str,
             field: str = "structured") -> "xgrammar.CompiledGrammar":
    """The grammar compiled for `vocabulary` (LRU by digest, kind, text). InvalidArgument
    naming `field` when it does not parse or when no token can begin an output."""
    key = (vocabulary.digest, kind, text)
    grammar = _compiled.get(key)
    if grammar is not None:
        return grammar
    grammar = _compiler(vocabulary).compile_grammar(parsed(kind, text, field))
    _check_accepting(grammar, vocabulary, field)
    return _compiled.put(key, grammar)


def _check_accepting(grammar: "xgrammar.CompiledGrammar", vocabulary: "Vocabulary",
                     field: str) -> None:
    """Refuses a grammar whose first mask is empty: it accepts no string, or none the
    vocabulary can spell (an output could never begin, nor end)."""
    xgr = xgrammar_module()
    matcher = xgr.GrammarMatcher(grammar)
    bitmask = xgr.allocate_token_bitmask(1, vocabulary.size)
    matcher.fill_next_token_bitmask(bitmask)
    if not bool(bitmask.any()):
        raise InvalidArgument("the grammar accepts no output this tokenizer can produce (no "
                              "string matches it, or none is spelt by the vocabulary's tokens)",
                              field)


def cache_clear() -> None:
    """Forgets every compiled grammar and compiler (tests, benchmarks)."""
    _compiled.clear()
    _compilers.clear()
    _parsed.cache_clear()
