"""Policy YAML within bounds: size-capped before reading, UTF-8 with a precise error, alias
expansion and nesting bounded, every refusal an InvalidArgument naming the file."""
from __future__ import annotations

import os
import time

import pytest

from sampler_service.errors import InvalidArgument
from sampler_service.policy.files import (MAX_POLICY_FILE_BYTES, MAX_YAML_DEPTH, content_stamp,
                                          load_yaml, load_yaml_file, read_policy_file)
from sampler_service.policy.registry import load_policy_file, parse_policy_text

#: "Billion laughs": 9 levels of 9 aliases, 10^9 strings once expanded, in 439 bytes.
ALIAS_BOMB = """\
a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
policies: {p: {chain: *i, select: sample}}
"""

ANCHORED = """
policies:
  base: &base
    chain: [{temperature: {temperature: 0.7}}, {top_k: {k: 40}}]
    select: sample
    overridable: &knobs [temperature, seed]
  warmer:
    <<: *base
    chain: [{temperature: {temperature: 1.1}}, {top_k: {k: 40}}]
  same: *base
  knobs: {chain: [temperature], select: sample, overridable: *knobs}
"""


def test_an_alias_bomb_is_refused_before_it_expands():
    assert len(ALIAS_BOMB) < 500
    start = time.perf_counter()
    with pytest.raises(InvalidArgument) as refused:
        parse_policy_text(ALIAS_BOMB, "bomb.yaml")
    assert time.perf_counter() - start < 0.5
    assert refused.value.field == "policies"
    assert refused.value.message.startswith("bomb.yaml: YAML aliases would repeat more than ")
    assert "(the cap on alias expansion)" in refused.value.message
    assert "the node anchored at line " in refused.value.message


def test_a_recursive_alias_and_deep_nesting_are_refused():
    with pytest.raises(InvalidArgument, match=r"^doc: a YAML alias refers to a collection that "
                                              r"contains it .* at line 1, column 4$"):
        load_yaml("a: &a [1, *a]", "doc")
    depth = MAX_YAML_DEPTH + 1
    with pytest.raises(InvalidArgument, match=rf"^doc: YAML nested deeper than {MAX_YAML_DEPTH} "):
        load_yaml("[" * depth + "]" * depth, "doc")
    assert load_yaml("[" * MAX_YAML_DEPTH + "]" * MAX_YAML_DEPTH, "doc") is not None


def test_anchors_aliases_and_merge_keys_within_the_budget_still_load():
    specs = parse_policy_text(ANCHORED, "anchored.yaml")
    assert specs["same"].content_hash() == specs["base"].content_hash()
    assert specs["same"].chain == specs["base"].chain != specs["warmer"].chain
    assert dict(specs["warmer"].chain)["temperature"]["temperature"] == pytest.approx(1.1)
    assert specs["knobs"].overridable == specs["base"].overridable


def test_values_python_cannot_convert_are_invalid_arguments():
    with pytest.raises(InvalidArgument, match=r"^doc: a YAML value cannot be read: "):
        load_yaml("k: " + "9" * 5000, "doc")  # more digits than int() accepts
    with pytest.raises(InvalidArgument, match=r"^doc: not valid YAML: "):
        load_yaml("k: [", "doc")


def test_bytes_that_are_not_utf8_are_refused_naming_where(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"policies:\n  caf\xe9: {select: greedy}\n")
    with pytest.raises(InvalidArgument) as refused:
        load_policy_file(path)
    assert refused.value.message == (f"{path}: not UTF-8: byte 0xe9 at line 2, column 6 "
                                     "(byte offset 15): invalid continuation byte")
    path.write_bytes("\ufeffpolicies:\n  café: {select: greedy}\n".encode())  # a BOM is fine
    assert list(load_policy_file(path)) == ["café"]


def test_a_file_over_the_cap_is_refused_before_reading(tmp_path):
    """An 8 GiB sparse file: refused at once by its size, and watched by its stat, unread."""
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as file:
        file.truncate(8 << 30)
    start = time.perf_counter()
    with pytest.raises(InvalidArgument) as refused:
        load_policy_file(path)
    assert refused.value.message == (f"{path}: {8 << 30} bytes, over the {MAX_POLICY_FILE_BYTES}"
                                     "-byte cap on a policy file or document")
    assert content_stamp(path).startswith(b"stat:")
    assert time.perf_counter() - start < 0.5


def test_the_cap_is_exact_for_files_and_documents(tmp_path):
    path = tmp_path / "edge.yaml"
    filler = "# " + "x" * 97 + "\n"
    head = "policies: {}\n"
    text = head + filler * ((MAX_POLICY_FILE_BYTES - len(head)) // len(filler))
    text += "#" * (MAX_POLICY_FILE_BYTES - len(text) - 1) + "\n"
    path.write_text(text)
    assert os.path.getsize(path) == MAX_POLICY_FILE_BYTES
    assert load_policy_file(path) == {}
    assert content_stamp(path).startswith(b"content:")
    path.write_text(text + "#")
    with pytest.raises(InvalidArgument, match=rf"{MAX_POLICY_FILE_BYTES + 1} bytes, over the"):
        load_yaml_file(path)
    wide = "policies: {}\n# " + "é" * (MAX_POLICY_FILE_BYTES // 2)  # few characters, many bytes
    with pytest.raises(InvalidArgument, match=r"^document: \d+ bytes, over the "):
        parse_policy_text(wide, "document")


def test_a_path_that_is_not_a_regular_file_is_refused_without_opening_it(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)  # opening it would block until a writer came
    with pytest.raises(InvalidArgument, match=r"pipe\.yaml: not a regular file$"):
        read_policy_file(fifo)
    assert content_stamp(fifo).startswith(b"stat:")


def test_policy_names_must_be_strings():
    with pytest.raises(InvalidArgument, match="a policy name must be a non-empty string, got a "
                                              "int"):
        parse_policy_text("policies: {1: {select: greedy}}", "doc")
    with pytest.raises(InvalidArgument, match=r"unknown top-level keys \['1', 'x'\]"):
        parse_policy_text("policies: {}\n1: 2\nx: 3", "doc")
