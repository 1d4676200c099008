"""Reading policy YAML with bounds: what a policy file or an admin document may cost to parse.

Every policy document — a `--policies` file (at start and on every hot reload), a document
sent to `PolicyAdmin.ValidatePolicy`, a file given to `sampler-service policies validate|put`
— goes through `load_yaml`, so one bad file can neither exhaust memory nor stall the service:

- **size**: at most `MAX_POLICY_FILE_BYTES` (1 MiB, a Kubernetes ConfigMap's own limit) per
  file or document. A file's size is checked with `stat` before anything is read, and the read
  itself stops past the cap (a file that grows meanwhile is refused too); a path that is not a
  regular file (a FIFO, a device) is refused without opening it.
- **encoding**: UTF-8 (a leading byte-order mark is allowed); other bytes are refused naming
  the line, column and byte offset of the first bad byte.
- **aliases**: YAML anchors and aliases (`&base`, `*base`, `<<: *base`) are allowed, but what
  they repeat is bounded: every alias adds the nodes and scalar characters of what it names,
  and past `MAX_YAML_ALIAS_EXPANSION` in all the document is refused (a 426-byte "billion
  laughs" document stands for 10^9 nodes). The check runs on the composed node graph, where an
  alias is one shared node, before any Python object is built. Recursive aliases are refused.
- **depth**: at most `MAX_YAML_DEPTH` nested collections.

Each refusal is an `InvalidArgument` whose message starts with the file (or document) name
and whose field is `policies`.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from sampler_service.errors import InvalidArgument

#: The largest policy file or document, in bytes (a ConfigMap holds at most 1 MiB).
MAX_POLICY_FILE_BYTES = 1 << 20
#: How many nodes plus scalar characters YAML aliases may add to a document in all.
MAX_YAML_ALIAS_EXPANSION = 100_000
#: The deepest nesting of collections (mappings, sequences) a document may have.
MAX_YAML_DEPTH = 64

FIELD = "policies"

#: libyaml's parser when PyYAML was built with it (fast, and bounds nesting itself), else
#: PyYAML's own. Both compose aliases as one shared node, which `_check_nodes` weighs.
_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _where(node: yaml.Node) -> str:
    mark = node.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_nodes(root: yaml.Node, source: str) -> None:
    """Refuses a composed document whose aliases would repeat more than
    `MAX_YAML_ALIAS_EXPANSION` nodes and characters, that refers to itself, or that nests
    deeper than `MAX_YAML_DEPTH`. One pass over the distinct nodes, without recursion."""
    weight: dict[int, int] = {}  # id(node) -> its nodes and scalar characters, aliases expanded
    open_: set[int] = set()  # collections whose children are being weighed
    added = 0
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            weight[key] = 1 + sum(weight[id(child)] for child in _children(node))
            continue
        if key in weight:  # met again: an alias (or a shared node) repeats all of it
            added += weight[key]
            if added > MAX_YAML_ALIAS_EXPANSION:
                raise InvalidArgument(
                    f"{source}: YAML aliases would repeat more than {MAX_YAML_ALIAS_EXPANSION} "
                    "nodes and characters (the cap on alias expansion); the last alias counted "
                    f"repeats the node anchored at {_where(node)}", FIELD)
            continue
        if key in open_:
            raise InvalidArgument(f"{source}: a YAML alias refers to a collection that contains "
                                  f"it (a recursive document), at {_where(node)}", FIELD)
        if isinstance(node, yaml.ScalarNode):
            weight[key] = 1 + len(node.value)
            continue
        if depth > MAX_YAML_DEPTH:
            raise InvalidArgument(f"{source}: YAML nested deeper than {MAX_YAML_DEPTH} levels, "
                                  f"at {_where(node)}", FIELD)
        open_.add(key)
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in reversed(_children(node)))


class BoundedSafeLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """yaml's safe loader that checks the composed node graph (`_check_nodes`) before it
    constructs any Python object. Set `source` (used in messages) after creating it."""

    source = "document"

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_nodes(node, self.source)
        return self.construct_document(node)


def _check_size(size: int, source: str) -> None:
    if size > MAX_POLICY_FILE_BYTES:
        raise InvalidArgument(f"{source}: {size} bytes, over the {MAX_POLICY_FILE_BYTES}-byte cap "
                              "on a policy file or document", FIELD)


def load_yaml(text: str, source: str) -> Any:
    """Parses one YAML document within the bounds of this module; `source` names it in errors.
    Raises InvalidArgument (field `policies`)."""
    if len(text) > MAX_POLICY_FILE_BYTES // 4:  # only then can its UTF-8 form be over the cap
        _check_size(len(text.encode("utf-8", "surrogatepass")), source)
    loader = BoundedSafeLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{source}: not valid YAML: {exc}", FIELD) from exc
    except (ValueError, RecursionError) as exc:  # e.g. an int of more digits than Python parses
        raise InvalidArgument(f"{source}: a YAML value cannot be read: {exc}", FIELD) from exc
    finally:
        loader.dispose()


def decode_utf8(data: bytes, source: str) -> str:
    """`data` as text; a leading byte-order mark is dropped. Invalid UTF-8 raises
    InvalidArgument naming the first bad byte's line, column and offset."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InvalidArgument(f"{source}: not UTF-8: byte 0x{data[exc.start]:02x} at line {line}, "
                              f"column {column} (byte offset {exc.start}): {exc.reason}",
                              FIELD) from exc


def read_policy_file(path: str | Path) -> str:
    """The text of a policy file: refused when it is not a regular file or larger than
    `MAX_POLICY_FILE_BYTES` (checked with stat, before reading; the read stops past the cap
    too), or not UTF-8. OSError when it cannot be read at all."""
    source = str(path)
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument(f"{source}: not a regular file", FIELD)
    _check_size(info.st_size, source)
    with open(path, "rb") as file:
        data = file.read(MAX_POLICY_FILE_BYTES + 1)
    if len(data) > MAX_POLICY_FILE_BYTES:
        raise InvalidArgument(f"{source}: grew past the {MAX_POLICY_FILE_BYTES}-byte cap on a "
                              "policy file or document while it was read", FIELD)
    return decode_utf8(data, source)


def load_yaml_file(path: str | Path) -> Any:
    """A policy file's YAML document, read and parsed within the bounds of this module."""
    return load_yaml(read_policy_file(path), str(path))


def content_stamp(path: str | Path) -> bytes:
    """What identifies a policy file's content, read without exceeding the bounds: the bytes
    of a regular file within the cap; for anything else (an oversize file, a FIFO) its type,
    size, modification time and inode, so that it is never read (whole) just to be watched."""
    info = os.stat(path)
    if stat.S_ISREG(info.st_mode) and info.st_size <= MAX_POLICY_FILE_BYTES:
        with open(path, "rb") as file:
            data = file.read(MAX_POLICY_FILE_BYTES + 1)
        if len(data) <= MAX_POLICY_FILE_BYTES:
            return b"content:" + data
        info = os.stat(path)  # it grew since the first stat
    return (f"stat:{info.st_mode}:{info.st_size}:{info.st_mtime_ns}:{info.st_ino}").encode()
