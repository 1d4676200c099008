"""Grammar parsing without a vocabulary: a grammar that accepts no string is refused where it
is written, and every grammar that accepts one (recursive ones, JSON schemas) is kept."""
from __future__ import annotations

import json

import pytest

from sampler_service.errors import InvalidArgument
from sampler_service.text import grammar as grammars


@pytest.mark.parametrize("text, endless", [
    ('root ::= "a" root', ["root"]),
    ('root ::= "a" b\nb ::= "c" b', ["root", "b"]),
    ('root ::= b{1,3}\nb ::= "x" b | b "y"', ["root", "b"]),
    ('root ::= "a" | "x" root', []),
    ('root ::= b{0,3}\nb ::= "x" b', []),  # zero repeats end
    ('root ::= [a-z]+ "." | "(" root ")"', []),
    ('root ::= "a" b | "c"\nb ::= "b" b', []),  # an endless rule the root need not take
])
def test_rules_that_never_end_are_named(text, endless, xgrammar):
    assert grammars.endless_rules(xgrammar.Grammar.from_ebnf(text)) == endless


def test_a_grammar_that_accepts_nothing_is_invalid_argument(xgrammar):
    with pytest.raises(InvalidArgument) as err:
        grammars.parsed("grammar", 'root ::= "{" item\nitem ::= "x" item', "spec.grammar")
    assert err.value.field == "spec.grammar"
    assert "accepts no string" in str(err.value) and "item" in str(err.value)


@pytest.mark.parametrize("kind, text", [
    ("json_object", ""),
    ("json_schema", json.dumps({"$defs": {"node": {"type": "object", "properties": {
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node"})),
    ("regex", "(ab|c)*d{2,}"),
    ("choice", json.dumps(["yes", "no"])),
])
def test_recursive_and_generated_grammars_are_kept(kind, text, xgrammar):
    assert grammars.endless_rules(grammars.parsed(kind, text, "f")) == []
