"""The state directory at the byte level: its layout, the frame format and the snapshot file.

`serve --state-dir DIR` keeps its sequences in DIR (docs/state-dir.md):
- `snapshot`: every live sequence at one moment, written whole and atomically (a temporary
  file, fsync, `os.replace`, fsync of the directory), so it is the old one or the new one;
- `journal-<generation>`: the changes committed since (`sampler_service.state.journal`);
- `lock`: held (flock) by the one service that owns DIR;
- `tokenizers/<hex digest>`: a vocabulary registered over RPC (`write_record`, one frame).
A snapshot of generation G is the state just before journal G's first change: restoring reads
it, then the journals G, G+1, ... in order.

Both kinds of file are a header, then frames (all integers little-endian):
    header  magic (8 bytes: b"SMPLSNAP", b"SMPLJRNL" or b"SMPLTOKN"), format version (u32), generation
            (u64); a snapshot's header adds its number of frames (u64)
    frame   payload length (u32, > 0), CRC-32 of the payload (u32), payload
Payloads are opaque here (the service writes protobuf messages: sampler.proto's persistence
section), so this layer never imports the proto edge.
"""
from __future__ import annotations

import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

#: The format of the files this service writes and reads.
FORMAT_VERSION = 1
SNAPSHOT_MAGIC = b"SMPLSNAP"
JOURNAL_MAGIC = b"SMPLJRNL"
TOKENIZER_MAGIC = b"SMPLTOKN"
_HEADER = struct.Struct("<8sIQ")        # magic, version, generation
_COUNT = struct.Struct("<Q")            # a snapshot's number of frames
_FRAME = struct.Struct("<II")           # payload length, CRC-32
#: A frame's payload is at most this long (a length beyond it is corruption, not a record).
MAX_PAYLOAD = (1 << 32) - 1

SNAPSHOT_NAME = "snapshot"
LOCK_NAME = "lock"
TOKENIZERS_NAME = "tokenizers"
_JOURNAL_NAME = re.compile(r"^journal-(\d{1,19})$")


class StateFileError(Exception):
    """A state file this service cannot read: foreign (wrong magic), of another format version,
    or corrupt. `path` names it; the message says what is wrong."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path


def frame(payload: bytes) -> bytes:
    """One frame holding `payload` (non-empty)."""
    if not payload or len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a frame's payload must hold 1 to {MAX_PAYLOAD} bytes, "
                         f"got {len(payload)}")
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def header(magic: bytes, generation: int) -> bytes:
    return _HEADER.pack(magic, FORMAT_VERSION, generation)


def read_header(path: Path, data: bytes, magic: bytes) -> tuple[int, int]:
    """(generation, offset of what follows the header) of a file's bytes `data`;
    StateFileError for a foreign file or another format version."""
    if len(data) < _HEADER.size or data[:8] != magic:
        what = {SNAPSHOT_MAGIC: "snapshot", JOURNAL_MAGIC: "journal"}.get(magic, "tokenizer")
        raise StateFileError(path, f"not a sampler-service {what} file (magic "
                                   f"{data[:8]!r}, expected {magic!r})")
    _, version, generation = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise StateFileError(path, f"format version {version}; this service reads version "
                                   f"{FORMAT_VERSION}")
    return generation, _HEADER.size


@dataclass(frozen=True)
class Frames:
    """The readable frames of `data` from an offset: their payloads and where they end. `bad`
    says why reading stopped before the end of `data` ("" when every byte was read);
    `bad_is_last`: the unreadable frame reaches the end of `data` (its header is cut short,
    its length takes it to the end or past it), or only zero bytes follow `end`."""

    payloads: list[bytes]
    end: int
    bad: str = ""
    bad_is_last: bool = False


def read_frames(data: bytes, offset: int, limit: int | None = None) -> Frames:
    """Frames from `offset` until the end of `data`, the first unreadable frame (incomplete,
    empty or failing its CRC), or `limit` frames."""
    payloads: list[bytes] = []
    while offset < len(data) and (limit is None or len(payloads) < limit):
        if offset + _FRAME.size > len(data):
            return Frames(payloads, offset, f"an incomplete frame header at byte {offset}", True)
        length, crc = _FRAME.unpack_from(data, offset)
        start, stop = offset + _FRAME.size, offset + _FRAME.size + length
        if stop > len(data):
            return Frames(payloads, offset, f"a frame at byte {offset} of {length} bytes runs "
                                            f"past the end ({len(data) - start} there)", True)
        payload = data[start:stop]
        if length == 0 or zlib.crc32(payload) != crc:
            problem = "is empty" if length == 0 else "fails its CRC"
            last = stop == len(data) or not data[offset:].strip(b"\0")
            return Frames(payloads, offset, f"the frame at byte {offset} {problem}", last)
        payloads.append(payload)
        offset = stop
    return Frames(payloads, offset)


@dataclass(frozen=True)
class Snapshot:
    generation: int
    payloads: list[bytes]


def read_snapshot(path: Path) -> Snapshot:
    """The snapshot at `path`; StateFileError when it is foreign, of another format version,
    or corrupt (a bad frame, fewer frames than its header says, bytes after them)."""
    data = path.read_bytes()
    generation, offset = read_header(path, data, SNAPSHOT_MAGIC)
    if len(data) < offset + _COUNT.size:
        raise StateFileError(path, "corrupt: the header ends early")
    count, = _COUNT.unpack_from(data, offset)
    frames = read_frames(data, offset + _COUNT.size, count)
    if frames.bad:
        raise StateFileError(path, f"corrupt: {frames.bad}")
    if len(frames.payloads) != count:
        raise StateFileError(path, f"corrupt: {len(frames.payloads)} frames, the header says "
                                   f"{count}")
    if frames.end != len(data):
        raise StateFileError(path, f"corrupt: {len(data) - frames.end} bytes after the last "
                                   "frame")
    return Snapshot(generation, frames.payloads)


def write_snapshot(path: Path, generation: int, payloads: Sequence[bytes]) -> None:
    """Replaces the snapshot at `path` atomically (`_write_atomically`)."""
    _write_atomically(path, [header(SNAPSHOT_MAGIC, generation) + _COUNT.pack(len(payloads)),
                             *(frame(payload) for payload in payloads)])


def write_record(path: Path, payload: bytes) -> None:
    """Replaces the one-record file at `path` (a tokenizer) atomically: a header of
    generation 0, then one frame."""
    _write_atomically(path, [header(TOKENIZER_MAGIC, 0), frame(payload)])


def read_record(path: Path) -> bytes:
    """The payload of `write_record`'s file; StateFileError when it is foreign, of another
    format version, or corrupt."""
    data = path.read_bytes()
    _, offset = read_header(path, data, TOKENIZER_MAGIC)
    frames = read_frames(data, offset)
    if frames.bad or len(frames.payloads) != 1:
        raise StateFileError(path, f"corrupt: {frames.bad or f'{len(frames.payloads)} frames'}")
    return frames.payloads[0]


def _write_atomically(path: Path, parts: Sequence[bytes]) -> None:
    """The old file or the new one, whole, is at `path` after a crash at any point: written to
    `path.tmp`, mode 0600, fsynced, renamed over `path`, then the directory fsynced."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as file:
        for part in parts:
            file.write(part)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Makes renames and unlinks in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def journal_name(generation: int) -> str:
    return f"journal-{generation}"


def journals(directory: Path) -> list[tuple[int, Path]]:
    """(generation, path) of every journal file in `directory`, oldest first."""
    found = []
    for path in directory.iterdir():
        match = _JOURNAL_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def move_aside(path: Path) -> Path:
    """Renames a refused state file to `<name>.corrupt-<UTC time>` (kept for inspection, never
    read again); returns the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    index = 1
    while target.exists():
        index += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{index}")
    path.rename(target)
    return target
