"""The journal: the changes committed since the last snapshot, appended before each answer.

One file per generation (`journal-<G>`, the framing of `sampler_service.state.snapshot`):
a header, then one frame per change, in commit order. `JournalFile.append` writes a commit's
frames with one `os.write` (looping over short writes) before the answer is returned. Without
`fsync` the bytes are in the kernel's page cache once `os.write` returns: they survive the
process being killed (SIGKILL, OOM), not the node crashing. With `fsync` each append is
durable before it returns (an fsync per commit, about 0.1-10 ms depending on the disk).

A process killed in the middle of a write leaves an incomplete last frame: `read_journal`
reports it as the torn tail (the change it held was never answered) and returns the frames
before it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sampler_service.state.snapshot import (JOURNAL_MAGIC, StateFileError, frame, header,
                                            read_frames, read_header)


class JournalFile:
    """The journal of generation `generation`, created new at `path` (an existing file is an
    error: FileExistsError) with its header written."""

    def __init__(self, path: Path, generation: int, fsync: bool = False):
        self.path = path
        self.generation = generation
        self._fsync = fsync
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            self._write(header(JOURNAL_MAGIC, generation))
        except BaseException:
            self.close()
            raise

    def append(self, payloads: Sequence[bytes]) -> None:
        """Appends one frame per payload, in order (OSError when the disk refuses)."""
        self._write(b"".join(frame(p) for p in payloads))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        if self._fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class JournalContents:
    """A journal's readable changes; `torn` describes the ignored tail ("" when none)."""

    generation: int
    payloads: list[bytes]
    torn: str


def read_journal(path: Path) -> JournalContents:
    """The changes of the journal at `path`. An unreadable last frame (incomplete, or complete
    but failing its CRC, or followed by zero bytes only) is the torn tail of a write that did
    not finish: reported in `torn`, not an error. StateFileError for a foreign file, another
    format version, or an unreadable frame followed by more data (corruption, not a torn
    write)."""
    data = path.read_bytes()
    generation, offset = read_header(path, data, JOURNAL_MAGIC)
    frames = read_frames(data, offset)
    torn = ""
    if frames.bad:
        if not frames.bad_is_last:
            raise StateFileError(path, f"corrupt: {frames.bad}, and more bytes follow it")
        torn = f"{frames.bad}: its {len(data) - frames.end} bytes are ignored"
    return JournalContents(generation, frames.payloads, torn)

