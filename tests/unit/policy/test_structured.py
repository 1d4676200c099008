"""The `structured` stage on a toy vocabulary: masks exact against a straightforward reference
(a token is allowed iff the output with its bytes is still a prefix of an accepted string),
the end at EOS, compile errors naming their field, retries that do not advance the matcher
and branches with matchers of their own."""
from __future__ import annotations

import math
import re

import pytest
import torch

from sampler_service.engine import Engine
from sampler_service.errors import InvalidArgument
from sampler_service.policy.candidates import Candidates
from sampler_service.policy.processors.base import RowBatch
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.server.convert import params_from_pb
from sampler_service.service import SamplerCore, SequenceRequest, StepRow
from sampler_service.state import SequenceStore
from sampler_service.state.sequence import FinishReason
from sampler_client.requests import sampling_params
from tests.unit.helpers import TOY_PIECES, TOY_VOCABULARY, random_logits

PIECES, VOCAB = TOY_PIECES, TOY_VOCABULARY
#: Logits wider than the vocabulary (padded ids).
WIDTH = len(PIECES) + 5


def core() -> SamplerCore:
    result = SamplerCore(PolicyRegistry.from_files(), SequenceStore(), Engine(torch.device("cpu")))
    result.tokenizers.register(VOCAB, "toy")
    return result


def create(c: SamplerCore, sid: str, structured, **params):
    c.create_sequences([SequenceRequest(sid, params={"structured": structured, **params},
                                        tokenizer="toy", eos_token_ids=(0,))])


def _finite(c: SamplerCore, sid: str) -> set[int]:
    return finite_of(c.store.get(sid))


def finite_of(state) -> set[int]:
    """The tokens the stage leaves finite for `state` at its next step (nothing remembered)."""
    link = next(l for l in state.policy.links if l.stage.key == "structured")
    candidates = Candidates(torch.zeros(1, WIDTH))
    batch = RowBatch([state], torch.device("cpu"))
    args = {p.name: ([link.values[p.name]] if p.kind != "bool"
                     else torch.tensor([link.values[p.name]])) for p in link.stage.params}
    link.stage.apply(candidates, args, batch)
    return {t for t in range(WIDTH) if candidates.values[0, t] > -math.inf}


def step(c: SamplerCore, sid: str, token: int):
    logits = torch.full((1, WIDTH), -5.0)
    logits[0, token] = 10.0
    return c.step([StepRow(sid)], logits)[0].record


def reference(prefix: bytes, accepts, done: bool) -> set[int]:
    """Tokens whose bytes keep `prefix` a prefix of an accepted string; EOS once `done`, or
    when no token can go on (a dead end the vocabulary cannot spell ends the sequence)."""
    result = {t for t, piece in enumerate(PIECES)
              if t > 1 and piece and accepts(prefix + piece)}
    return result | ({0} if done or not result else set())


@pytest.mark.parametrize("choices", [["yes", "no"], ["abc", "ab", "a"], ["12", "-1", "é"]])
def test_choice_masks_equal_the_prefix_reference(choices, xgrammar):
    c = core()
    create(c, "s", {"choice": choices}, temperature=0.0)
    encoded = [s.encode() for s in choices]
    output = b""
    for _ in range(8):
        expected = reference(output, lambda text: any(e.startswith(text) for e in encoded),
                             output in encoded)
        assert _finite(c, "s") == expected
        # take the longest allowed piece (EOS only when it is the only one), then the smallest
        # (a dead end on the next run)
        rest = sorted(expected - {0}, key=lambda t: (len(PIECES[t]), t))
        token = (rest[-1] if len(output) % 2 == 0 else rest[0]) if rest else 0
        record = step(c, "s", token)
        if token == 0:
            assert record.finished and record.finish_reason == FinishReason.STOP
            break
        output += PIECES[token]


def test_regex_masks_equal_the_prefix_reference(xgrammar):
    c = core()
    pattern = "(ab|ba)+c?"
    create(c, "r", {"regex": pattern}, temperature=0.0)
    compiled = re.compile(pattern.encode())
    # a prefix of a match of (ab|ba)+c? : bounded search over short completions
    completions = [b"", b"a", b"b", b"ab", b"ba", b"c", b"abc", b"bac", b"ac", b"bc"]

    def accepts(text: bytes) -> bool:
        return any(compiled.fullmatch(text + tail) for tail in completions)
    output = b""
    for token in [4, 5, 3, 2, 6]:  # ab, ba, b, a, c
        expected = reference(output, accepts, bool(compiled.fullmatch(output)))
        assert _finite(c, "r") == expected
        assert token in expected
        step(c, "r", token)
        output += PIECES[token]
    assert _finite(c, "r") == {0}  # complete: only EOS
    assert step(c, "r", 0).finished


def test_padded_ids_and_special_tokens_are_masked(xgrammar):
    c = core()
    create(c, "j", {"json_object": True})
    finite = _finite(c, "j")
    assert 1 not in finite and not finite & set(range(len(PIECES), WIDTH))


def test_a_retried_step_does_not_advance_the_matcher_and_a_branch_has_its_own(xgrammar):
    c = core()
    create(c, "s", {"choice": ["yes", "no", "ye"]}, temperature=0.0)
    after_y = reference(b"y", lambda t: any(e.startswith(t) for e in (b"yes", b"ye")), False)
    step(c, "s", 13)  # "y"
    first = step(c, "s", max(after_y))
    matcher = c.store.get("s").processor_state["structured"]
    consumed = matcher.consumed
    again = c.step([StepRow("s", step=1)], torch.zeros(1, WIDTH))[0].record  # a retry
    assert again == first and matcher.consumed == consumed
    assert c.store.get("s").processor_state["structured"] is matcher
    # a branch that went on differently rebuilds its matcher from its own tokens
    state = c.store.get("s")
    other = state.branch("s#1")
    other.output_ids[:] = [8]  # "no"
    assert finite_of(other) == {0}
    assert other.processor_state["structured"] is matcher  # its copy is not written to
    assert matcher.owner == "s" and finite_of(state) == reference(
        b"y" + PIECES[first.token_id], lambda t: any(e.startswith(t) for e in (b"yes", b"ye")),
        b"y" + PIECES[first.token_id] in (b"yes", b"ye"))


def test_forks_each_follow_their_own_tokens(xgrammar):
    c = core()
    c.create_sequences([SequenceRequest("f", params={"structured": {"choice": ["yes", "no"]},
                                                     "n": 2, "temperature": 0.0, "seed": 1},
                                        tokenizer="toy", eos_token_ids=(0,))])
    logits = torch.full((1, WIDTH), -5.0)
    logits[0, 13] = 10.0  # "y"
    record = c.step([StepRow("f")], logits)[0].record
    assert [r.token_id for r in record.rows] == [13, 13]
    logits = torch.full((2, WIDTH), -5.0)
    logits[0, 10] = 10.0  # fork 0 would like "s": not allowed after "y" ("ye" needed)
    logits[0, 18] = 9.0
    logits[1, 18] = 10.0
    record = c.step([StepRow("f"), StepRow("f")], logits)[0].record
    tokens = [r.token_id for r in record.rows]
    # after "y" only "e..." continues "yes": no toy token starts with "e", so both rows end
    assert all(t in (0,) or PIECES[t] and b"yes".startswith(b"y" + PIECES[t]) for t in tokens)


@pytest.mark.parametrize("select, defaults", [
    ({"beam": {"width": 3}}, {}), ({"beam": {"width": 4, "groups": 2}}, {}),
    ({"cot": {"k": 3}}, {}), ("sample", {"n": 3, "seed": 4}), ("sample", {"best_of": 3, "seed": 5}),
])
def test_every_row_of_a_group_follows_the_grammar(select, defaults, xgrammar):
    """Beams keep a matcher per hypothesis, forks and CoT branches one each: every finished
    output of the group is one of the choices."""
    choices = ["a-b-c", "ab-ba", "12-x", "x-1", "no-ab"]  # no dead end in the toy vocabulary
    c = core()
    c.create_sequences([SequenceRequest("g", policy_spec={
        "chain": [{"structured": {"choice": choices}}], "select": select,
        "defaults": {"max_tokens": 12, **defaults}}, tokenizer="toy", eos_token_ids=(0,))])
    for index in range(12):
        rows = c.read("g", lambda entry: entry.running_rows)
        if not rows:
            break
        c.step([StepRow("g")] * rows, random_logits(index, rows, WIDTH))
    group = c.store.get("g")
    assert group.finished
    outputs = [b"".join(PIECES[t] for t in h.token_ids).decode() for h in group.hypotheses()]
    assert outputs and set(outputs) <= set(choices)


@pytest.mark.parametrize("structured, field", [
    ({"regex": "a("}, "sequences[0].params.structured.regex"),
    ({"json_schema": {"type": "foo"}}, "sequences[0].params.structured.json_schema"),
    ({"json_schema": "{not json"}, "sequences[0].params.structured.json_schema"),
    ({"grammar": "root ::= b"}, "sequences[0].params.structured.grammar"),
    ({"grammar": 'root ::= root "a"'}, "sequences[0].params.structured.grammar"),
    ({"grammar": 'root ::= "a" b\nb ::= "c" b | b "d"'},  # accepts nothing: b never ends
     "sequences[0].params.structured.grammar"),
    ({"regex": "a", "choice": ["b"]}, "sequences[0].params.structured.choice"),
    ({"regex": "q+"}, "sequences[0].params.structured.regex"),  # no token spells "q"
    ({"nope": 1}, "sequences[0].params.structured.nope"),
])
def test_compile_errors_name_their_field(structured, field, xgrammar):
    with pytest.raises(InvalidArgument) as err:
        create(core(), "bad", structured)
    assert err.value.field == field


def test_a_policy_spec_names_its_chain_entry_and_a_tokenizer_is_needed(xgrammar):
    c = core()
    with pytest.raises(InvalidArgument) as err:
        c.create_sequences([SequenceRequest("p", policy_spec={
            "chain": [{"structured": {"regex": "a("}}], "select": "greedy"}, tokenizer="toy")])
    assert err.value.field == "sequences[0].policy_spec.chain[0].structured.regex"
    with pytest.raises(InvalidArgument) as err:
        c.create_sequences([SequenceRequest("p", params={"structured": {"regex": "a+"}})])
    assert err.value.field == "sequences[0].tokenizer"


def test_the_sdk_and_the_proto_carry_every_kind():
    for given, flat in [({"json_schema": {"type": "object", "properties": {"b": {}, "a": {}}}},
                         {"json_schema": '{"type":"object","properties":{"b":{},"a":{}}}'}),
                        ({"json_object": True}, {"json_object": True}),
                        ({"regex": "a+"}, {"regex": "a+"}),
                        ({"grammar": 'root ::= "a"'}, {"grammar": 'root ::= "a"'}),
                        ({"choice": ["x", "y"]}, {"choice": ["x", "y"]})]:
        assert params_from_pb(sampling_params({"structured": given})) == {"structured": flat}
    with pytest.raises(ValueError):
        sampling_params({"structured": {"regex": "a", "choice": ["b"]}})
