"""Structured outputs on SmolLM2 through the sidecar, sampling at T = 0.7 with several seeds:
every json_schema output parses and validates against its schema, every regex output fully
matches, every choice output is one of the choices, every grammar output parses."""
from __future__ import annotations

import json
import re

import pytest

from sampler_client import hf

SEEDS = (1, 2)  # SmolLM2 on the CPU: ~0.15 s a token; the file stays near a minute
MAX_NEW = 48

SCHEMAS = [
    # nested object with required fields and a bounded integer
    {"type": "object",
     "properties": {"name": {"type": "string", "maxLength": 12},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "city": {"type": "object", "properties": {"zip": {"type": "string",
                                                                      "pattern": "[0-9]{5}"}},
                             "required": ["zip"]}},
     "required": ["name", "age", "city"]},
    # an array of enums, a bounded number and a boolean
    {"type": "object",
     "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                               "minItems": 1, "maxItems": 3},
                    "score": {"type": "number", "minimum": 0, "maximum": 1},
                    "ok": {"type": "boolean"}},
     "required": ["colors", "score", "ok"]},
]


def generate(smollm2, client, prompt: str, structured, seed: int) -> tuple[str, bool]:
    model, tokenizer = smollm2
    input_ids = hf.chat_ids(tokenizer, prompt)
    results: list = []
    ids, = hf.generate(model, input_ids, client, params={"temperature": 0.7,
                                                         "structured": structured},
                       seed=seed, max_new_tokens=MAX_NEW, tokenizer=tokenizer, results=results)
    ended = bool(ids) and ids[-1] == tokenizer.eos_token_id
    return tokenizer.decode(ids, skip_special_tokens=True), ended


@pytest.mark.e2e
@pytest.mark.parametrize("schema", SCHEMAS, ids=["nested", "array-enum-number"])
def test_json_schema_outputs_validate(smollm2, client, schema):
    pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    for seed in SEEDS:
        text, ended = generate(smollm2, client, "Describe a person as JSON.",
                               {"json_schema": schema}, seed)
        assert ended, text  # the grammar completed and EOS ended it
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.e2e
def test_regex_choice_and_grammar_outputs_match(smollm2, client):
    pytest.importorskip("xgrammar")
    pattern = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    choices = ["Paris", "London", "Berlin"]
    grammar = 'root ::= term ("+" term)*\nterm ::= [1-9] [0-9]?'
    for seed in SEEDS:
        text, ended = generate(smollm2, client, "Give a date.", {"regex": pattern}, seed)
        assert ended and re.fullmatch(pattern, text), text
        text, ended = generate(smollm2, client, "What is the capital of France?",
                               {"choice": choices}, seed)
        assert ended and text in choices, text
    text, ended = generate(smollm2, client, "Add a few small numbers.", {"grammar": grammar}, 1)
    assert re.fullmatch(r"[1-9][0-9]?(\+[1-9][0-9]?)*", text), text


@pytest.mark.e2e
def test_greedy_json_object_equals_xgrammar_in_process(smollm2, client):
    """The same constraint applied in-process by xgrammar's own Hugging Face logits processor,
    from the tokenizer object (not our token bytes), gives the same greedy tokens."""
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.contrib.hf import LogitsProcessor

    from sampler_service.text.grammar import JSON_ANY_WHITESPACE
    model, tokenizer = smollm2
    input_ids = hf.chat_ids(tokenizer, "Give a JSON object about a cat.")
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=model.config.vocab_size)
    grammar = xgr.GrammarCompiler(info).compile_json_schema(
        '{"type": "object"}', any_whitespace=JSON_ANY_WHITESPACE)
    expected = model.generate(input_ids, do_sample=False, max_new_tokens=MAX_NEW,
                              logits_processor=[LogitsProcessor(grammar)]
                              )[0, input_ids.shape[1]:].tolist()
    got, = hf.generate(model, input_ids, client,
                       params={"temperature": 0.0, "structured": {"json_object": True}},
                       max_new_tokens=MAX_NEW, tokenizer=tokenizer)
    assert got == expected
    if got[-1] == tokenizer.eos_token_id:  # completed: a JSON object
        assert isinstance(json.loads(tokenizer.decode(got, skip_special_tokens=True)), dict)
