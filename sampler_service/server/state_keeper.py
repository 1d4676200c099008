"""`serve --state-dir DIR`: the sequences survive a restart of the service (docs/state-dir.md).

Start (`restore`, then `start`; before the server binds its ports, so no call sees a store
half restored and health turns SERVING after): DIR's lock is taken (a second service on DIR
fails to start), the snapshot is read, then every journal from the snapshot's generation on,
in order; `SamplerCore.restore` brings the sequences back. A file that cannot be read (foreign,
another format version, corrupt, a journal missing from the chain) is refused with a log line:
every state file is moved aside (`*.corrupt-<time>`) and the service starts empty. A torn last
frame of the last journal (a write the process did not finish) is ignored with a log line.
Then a snapshot of what was restored is written as generation G, journal G is started and
attached to the core, and older journals are deleted.

While serving, the core reports every committed change to the journal before the change's
answer returns (`_Journal`, one `os.write` per commit). Every `interval_s` seconds
`SamplerCore.checkpoint` saves the sequences and, under the core's lock, moves the journal
to generation G+1; snapshot G+1 then replaces the old one atomically and older journals are
deleted. A crash in between leaves snapshot G with journals G and G+1, which restore reads.
`close` (after the server drained its calls) writes the final snapshot.

Vocabularies registered over RPC (RegisterTokenizer) are kept too, one file each in
DIR/tokenizers (written before the registration answers), and registered again, with their
names, before the sequences are restored: a restored sequence finds the tokenizer it named.

A journal write that fails (a full disk) is logged and the state files are removed, so that a
restart starts empty rather than with sequences behind their clients; the next snapshot starts
a new journal.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Sequence

from google.protobuf.message import DecodeError

from sampler_client.vocabulary import Vocabulary
from sampler_proto.sampler.v1 import sampler_pb2 as pb

from sampler_service.errors import SamplerServiceError
from sampler_service.saved import SavedSequence, SavedState, SavedStateError, SavedStep
from sampler_service.server.state_codec import (StateDecodeError, apply_change, created_bytes,
                                                released_bytes, sequence_bytes,
                                                sequence_from_bytes, stepped_bytes)
from sampler_service.service import SamplerCore
from sampler_service.state.journal import JournalFile, read_journal
from sampler_service.state.snapshot import (LOCK_NAME, SNAPSHOT_NAME, TOKENIZERS_NAME,
                                            StateFileError, journal_name, journals, move_aside,
                                            read_record, read_snapshot, write_record,
                                            write_snapshot)
from sampler_service.text.registry import checked_vocabulary

log = logging.getLogger(__name__)

#: Seconds between snapshots (`--snapshot-interval`).
DEFAULT_SNAPSHOT_INTERVAL_S = 30.0


class _Journal:
    """The core's `CommitLog`: each change encoded and appended to the journal file of the
    current generation. A failure calls `on_failure` once and stops appending until the next
    `checkpoint` opens a new file."""

    def __init__(self, directory: Path, generation: int, fsync: bool,
                 on_failure: Callable[[], None]):
        self._directory, self._fsync, self._on_failure = directory, fsync, on_failure
        self.generation = generation
        self.file: JournalFile | None = JournalFile(directory / journal_name(generation),
                                                    generation, fsync)

    def created(self, sequences: Sequence[SavedSequence]) -> None:
        self._append(lambda: [created_bytes(s) for s in sequences])

    def stepped(self, steps: Sequence[SavedStep]) -> None:
        self._append(lambda: [stepped_bytes(s) for s in steps])

    def released(self, sequence_ids: Sequence[str]) -> None:
        self._append(lambda: [released_bytes(sequence_ids)])

    def checkpoint(self) -> None:
        """The next generation's file replaces the current one."""
        self.close()
        self.generation += 1
        try:
            self.file = JournalFile(self._directory / journal_name(self.generation),
                                    self.generation, self._fsync)
        except OSError as exc:
            log.error("state: cannot start journal %d: %s", self.generation, exc)
            self._on_failure()

    def _append(self, encode: Callable[[], list[bytes]]) -> None:
        if self.file is None:
            return
        try:
            self.file.append(encode())
        except Exception:  # never fail a committed change: it is answered, unjournaled
            log.exception("state: journal %s: append failed; the state files are removed "
                          "until the next snapshot", self.file.path)
            self.close()
            self._on_failure()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class StateKeeper:
    """Keeps `core`'s sequences in `directory` (see the module docstring). `interval_s`: seconds
    between snapshots (0: only at start and stop); `fsync`: each journal append is fsynced."""

    def __init__(self, directory: Path, core: SamplerCore,
                 interval_s: float = DEFAULT_SNAPSHOT_INTERVAL_S, fsync: bool = False):
        if interval_s < 0:
            raise ValueError(f"--snapshot-interval must be >= 0, got {interval_s}")
        self.directory, self.core, self.interval_s, self.fsync = directory, core, interval_s, fsync
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(directory)
        self._journal: _Journal | None = None
        self._next_generation = 1
        self._snapshot_lock = threading.Lock()  # one snapshot at a time
        self._files_lock = threading.Lock()     # a snapshot write vs. a journal failure
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def _snapshot_path(self) -> Path:
        return self.directory / SNAPSHOT_NAME

    # -- tokenizers ---------------------------------------------------------------------------
    @property
    def _tokenizers_path(self) -> Path:
        return self.directory / TOKENIZERS_NAME

    def _restore_tokenizers(self) -> None:
        """Registers every vocabulary kept in DIR/tokenizers, with its names, before the
        sequences that name them come back; one that cannot be read or registered is skipped
        with a log line (the sequences naming it are then skipped too)."""
        if not self._tokenizers_path.is_dir():
            return
        for path in sorted(self._tokenizers_path.glob("sha256-*")):
            if path.name.endswith(".tmp"):
                continue
            try:
                saved = pb.SavedTokenizer.FromString(read_record(path))
                request = saved.vocabulary
                vocabulary = checked_vocabulary(list(request.tokens), list(request.special_ids),
                                                list(request.eos_token_ids),
                                                request.tokenizer_json)
                if _file_name(vocabulary.digest) != path.name:
                    raise StateFileError(path, f"holds vocabulary {vocabulary.digest}")
                for name in list(saved.names) or [""]:
                    self.core.tokenizers.register(vocabulary, name)
            except (StateFileError, SamplerServiceError, DecodeError, OSError) as exc:
                log.error("state: tokenizer %s not restored: %s", path, exc)
                continue
            log.info("state: tokenizer %s restored (%d tokens, names %s)", vocabulary.digest,
                     vocabulary.size, ", ".join(saved.names) or "none")

    def _keep_tokenizer(self, vocabulary: Vocabulary, names: tuple[str, ...]) -> None:
        """`TokenizerRegistry.on_change`: the vocabulary and its names written to
        DIR/tokenizers before RegisterTokenizer answers. A failed write is logged (the
        registration stands; a restart would not find that tokenizer)."""
        saved = pb.SavedTokenizer(vocabulary=pb.RegisterTokenizerRequest(
            tokens=vocabulary.tokens, special_ids=sorted(vocabulary.special_ids),
            eos_token_ids=vocabulary.eos_token_ids, tokenizer_json=vocabulary.encoder_json),
            names=sorted(names))
        try:
            self._tokenizers_path.mkdir(mode=0o700, exist_ok=True)
            write_record(self._tokenizers_path / _file_name(vocabulary.digest),
                         saved.SerializeToString())
        except OSError as exc:
            log.error("state: cannot keep tokenizer %s in %s: %s; a restart will not find it",
                      vocabulary.digest, self._tokenizers_path, exc)

    # -- start --------------------------------------------------------------------------------
    def restore(self) -> list[str]:
        """Restores the tokenizers registered over RPC, then the sequences the directory
        holds; returns their ids."""
        self._restore_tokenizers()
        try:
            state = self._read()
        except StateFileError as exc:
            log.error("state: %s: refused; the service starts empty (state files moved aside "
                      "as *.corrupt-<time>)", exc)
            for path in self._state_files():
                move_aside(path)
            return []
        restored = self.core.restore(list(state.sequences.values()))
        log.info("state: restored %d of %d sequences from %s", len(restored),
                 len(state.sequences), self.directory)
        return restored

    def _read(self) -> SavedState:
        """The saved sequences of the snapshot and the journals after it (StateFileError)."""
        found = journals(self.directory)
        self._next_generation = 1 + max((g for g, _ in found), default=0)
        temporary = self._snapshot_path.with_name(SNAPSHOT_NAME + ".tmp")
        if temporary.exists():  # a snapshot whose write did not finish: never complete
            temporary.unlink()
        if not self._snapshot_path.exists():
            if found:
                raise StateFileError(found[0][1], "a journal without the snapshot it follows")
            return SavedState()
        snapshot = read_snapshot(self._snapshot_path)
        self._next_generation = max(self._next_generation, snapshot.generation + 1)
        state = SavedState(_decoded(self._snapshot_path, index, sequence_from_bytes, payload)
                           for index, payload in enumerate(snapshot.payloads))
        chain = [(g, path) for g, path in found if g >= snapshot.generation]
        for position, (generation, path) in enumerate(chain):
            if generation != snapshot.generation + position:
                raise StateFileError(path, f"journal {snapshot.generation + position} is missing "
                                           "before it")
            contents = read_journal(path)
            if contents.generation != generation:
                raise StateFileError(path, f"its header says generation {contents.generation}")
            for index, payload in enumerate(contents.payloads):
                _decoded(path, index, lambda p: apply_change(p, state), payload)
            if contents.torn and position + 1 < len(chain):
                raise StateFileError(path, f"corrupt: {contents.torn}, and journal "
                                           f"{generation + 1} follows")
            if contents.torn:
                log.warning("state: %s: torn tail (a write the process did not finish): %s",
                            path, contents.torn)
        return state

    def start(self) -> None:
        """Writes the restored state as snapshot G, attaches journal G, starts the periodic
        snapshots (OSError when the directory cannot be written)."""
        generation = self._next_generation
        self._journal = _Journal(self.directory, generation, self.fsync, self._discard_files)
        self._write(self.core.checkpoint(), generation)
        self.core.attach_journal(self._journal)
        self.core.tokenizers.on_change = self._keep_tokenizer
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._run, name="sampler-snapshots",
                                            daemon=True)
            self._thread.start()

    # -- serving ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.snapshot()
            except Exception:
                log.exception("state: snapshot failed; the journal keeps the changes")

    def snapshot(self) -> None:
        """Saves every sequence, moves the journal to its next generation, writes that
        generation's snapshot and deletes the older journals."""
        with self._snapshot_lock:
            saved = self.core.checkpoint()
            if self._journal.file is None:
                log.error("state: no journal: snapshot skipped (a snapshot alone would restore "
                          "sequences behind their clients)")
                return
            self._write(saved, self._journal.generation)

    def _write(self, saved: list[SavedSequence], generation: int) -> None:
        payloads = [sequence_bytes(s) for s in saved]
        with self._files_lock:
            write_snapshot(self._snapshot_path, generation, payloads)
            for older, path in journals(self.directory):
                if older < generation:
                    path.unlink()

    def _discard_files(self) -> None:
        """A journal write failed: the files no longer hold the state; remove them."""
        with self._files_lock:
            for path in self._state_files():
                path.unlink()

    def _state_files(self) -> list[Path]:
        paths = [path for _, path in journals(self.directory)]
        if self._snapshot_path.exists():
            paths.append(self._snapshot_path)
        return paths

    # -- stop ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Stops the periodic snapshots, writes the final one (call it once no change can come:
        after the server drained), and releases the directory. Closing again does nothing."""
        if self._lock_fd < 0:
            return
        self._stop.set()
        self.core.tokenizers.on_change = None
        if self._thread is not None:
            self._thread.join()
        try:
            if self._journal is not None:
                with self._snapshot_lock:
                    self.core.attach_journal(None)
                    self._journal.close()
                    self._write(self.core.checkpoint(), self._journal.generation + 1)
                    log.info("state: final snapshot written to %s", self._snapshot_path)
        except OSError as exc:
            log.error("state: final snapshot failed (%s); the last snapshot and its journals "
                      "still hold the state", exc)
        finally:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _file_name(digest: str) -> str:
    """A tokenizer's file in DIR/tokenizers: its digest with "-" for ":"."""
    return digest.replace(":", "-")


def _lock(directory: Path) -> int:
    """Takes `directory`'s lock file (held until the fd closes); OSError if another process
    holds it."""
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(f"--state-dir {directory}: another service holds it (lock file "
                      f"{directory / LOCK_NAME})") from None
    return fd


def _decoded(path: Path, index: int, decode, payload: bytes):
    """`decode(payload)` of frame `index` of `path`, its errors as StateFileError."""
    try:
        return decode(payload)
    except (StateDecodeError, SavedStateError) as exc:
        raise StateFileError(path, f"corrupt: frame {index}: {exc}") from None
