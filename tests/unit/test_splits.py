"""A/B splits: deterministic, proportional assignment by sequence id, and their validation."""
from __future__ import annotations

import pytest

from sampler_service.errors import InvalidArgument
from sampler_service.policy.registry import PolicyRegistry, parse_policy_text

DOCUMENT = """
policies:
  a: {select: greedy}
  b: {select: sample}
  c: {select: sample}
  chat: {split: {a: 0.7, b: 0.2, c: 0.1}}
"""


def test_assignment_follows_the_weights_within_three_percent_over_10000_ids():
    split = parse_policy_text(DOCUMENT, "doc")["chat"]
    counts = {"a": 0, "b": 0, "c": 0}
    for i in range(10_000):
        counts[split.assign(f"request-{i}")] += 1
    for variant, weight in split.variants:
        assert abs(counts[variant] / 10_000 - weight) <= 0.03, (variant, counts)


def test_the_same_id_always_gets_the_same_variant():
    split = parse_policy_text(DOCUMENT, "doc")["chat"]
    again = parse_policy_text(DOCUMENT, "doc")["chat"]
    assert all(split.assign(f"id{i}") == again.assign(f"id{i}") for i in range(500))


def test_weights_are_normalised():
    split = parse_policy_text(DOCUMENT.replace("0.7, b: 0.2, c: 0.1", "7, b: 2, c: 1"),
                              "doc")["chat"]
    assert [w for _, w in split.variants] == pytest.approx([0.7, 0.2, 0.1])


def test_a_registry_split_resolves_to_its_variant_and_names_itself():
    registry = PolicyRegistry(parse_policy_text(DOCUMENT, "doc"))
    spec, version, split = registry.get("chat", sequence_id="request-1")
    assert split == "chat" and spec.name == registry.entries()["chat"].spec.assign("request-1")
    assert version == registry.entry(spec.name).version


@pytest.mark.parametrize("text, field", [
    ("  chat: {split: {a: 0.5, missing: 0.5}}", "policies.chat.split.missing"),
    ("  chat: {split: {a: 0}}", "policies.chat.split.a"),
    ("  chat: {split: {}}", "policies.chat.split"),
    ("  chat: {split: {chat: 1}}", "policies.chat.split.chat"),
])
def test_invalid_splits_name_the_field(text, field):
    document = DOCUMENT.replace("  chat: {split: {a: 0.7, b: 0.2, c: 0.1}}", text)
    with pytest.raises(InvalidArgument) as err:
        PolicyRegistry(parse_policy_text(document, "doc"))
    assert err.value.field == field


@pytest.mark.parametrize("weight", [float("inf"), float("nan")])
def test_a_weight_that_is_not_finite_is_refused(weight):
    """An infinite weight made the normalised weights NaN: every sequence went to the last
    variant, silently."""
    from sampler_service.policy.splits import parse_split
    with pytest.raises(InvalidArgument) as err:
        parse_split("ab", {"split": {"a": 1.0, "b": weight}}, "policies.ab")
    assert err.value.field.endswith(".b") and "finite" in str(err.value)
