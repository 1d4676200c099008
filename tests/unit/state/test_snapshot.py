"""`--state-dir`: sequences and groups saved by snapshot and journal continue after a restart
exactly as the uninterrupted ones, a retried last step gets its answer again, and files that
cannot be read are refused (a log line, moved aside, the service starts empty) while a torn
journal tail is ignored."""
from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch

from sampler_service.engine import Engine
from sampler_service.groups import Group
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.policy.resolved import PolicyVersion
from sampler_service.policy.spec import parse_policy, resolve, resolve_flat
from sampler_service.saved import SavedPolicy
from sampler_service.server.state_codec import sequence_bytes
from sampler_service.server.state_keeper import StateKeeper
from sampler_service.service import SamplerCore, SequenceRequest, StepRow
from sampler_service.state.journal import JournalFile, read_journal
from sampler_service.state.snapshot import (FORMAT_VERSION, SNAPSHOT_MAGIC, frame, journals,
                                            read_snapshot, write_snapshot)
from sampler_service.state.store import SequenceStore

VOCAB = 300
STEPS = 8
SPECS = {
    "sample": {"chain": [{"repetition_penalty": {"penalty": 1.3}},
                         {"no_repeat_ngram": {"size": 2}}, {"temperature": {"temperature": 1.5}}],
               "select": "sample", "defaults": {"seed": 4}},
    "mirostat": {"chain": [], "select": {"mirostat": {"tau": 3.0}}, "defaults": {"seed": 3}},
    "beam": {"chain": [], "select": {"beam": {"width": 3}}, "defaults": {"max_tokens": 8}},
    "forks": {"chain": [{"temperature": {"temperature": 1.2}}], "select": "sample",
              "defaults": {"n": 3, "max_tokens": 8, "seed": 5}},
    "cot": {"chain": [], "select": {"cot": {"k": 3}}, "defaults": {"max_tokens": 8, "seed": 6}},
}


def new_core(store: SequenceStore | None = None) -> SamplerCore:
    return SamplerCore(PolicyRegistry.from_files(), SequenceStore() if store is None else store,
                       Engine(torch.device("cpu")))


def started(directory: Path, core: SamplerCore | None = None) -> StateKeeper:
    keeper = StateKeeper(directory, core or new_core(), interval_s=0)
    keeper.restore()
    keeper.start()
    return keeper


def killed(keeper: StateKeeper, tmp_path: Path) -> Path:
    """What a SIGKILL of the keeper's service leaves: its directory's files as they are now
    (appends are written through, nothing waits in the process)."""
    copy = tmp_path / f"killed-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(keeper.directory, copy)
    return copy


def create(core: SamplerCore, name: str, sid: str = "s") -> None:
    core.create_sequences([SequenceRequest(sid, policy_spec=SPECS[name], prompt_ids=(1, 2, 3),
                                           eos_token_ids=(0,))])


def step(core: SamplerCore, index: int, sid: str = "s"):
    """Step `index` of `sid` on logits seeded by the index (EOS a close second at step 2, so
    beams fill slots and CoT branches end early), or its retry; its record."""
    last = core.read(sid, lambda entry: entry.last_record)
    rows = last.rows_in if last is not None and last.step == index else core.read(
        sid, lambda entry: entry.running_rows)
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(index)) * 3
    if index == 2:
        logits[:, 0] = logits.amax(dim=1) - 0.3
    answer, = core.step([StepRow(sid, index)] * rows, logits)
    return answer.record


def finished(core: SamplerCore, sid: str = "s") -> bool:
    return core.read(sid, lambda entry: entry.finished)


def uninterrupted(name: str) -> list:
    core = new_core()
    create(core, name)
    records = []
    for index in range(STEPS):
        records.append(step(core, index))
        if finished(core):
            break
    return records


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("stop", ["kill", "close"])
@pytest.mark.parametrize("restart_at", [0, 3, 5])
def test_a_restart_continues_exactly_and_answers_the_last_step_again(tmp_path, name, stop,
                                                                     restart_at):
    """Steps before the restart are journaled (and, at 3, snapshotted mid-way: the journal
    moves on a generation); after it the same step numbers give the uninterrupted records,
    and the step before the restart, retried, gets its answer again."""
    expected = uninterrupted(name)
    restart_at = min(restart_at, len(expected))
    keeper = started(tmp_path / "state")
    create(keeper.core, name)
    for index in range(restart_at):
        assert step(keeper.core, index) == expected[index]
        if index == 1:
            keeper.snapshot()
    if stop == "kill":
        directory = killed(keeper, tmp_path)
    else:
        keeper.close()
        directory = keeper.directory
    restored = started(directory)
    assert [e.sequence_id for e in restored.core.store.snapshot()] == ["s"]
    if restart_at:
        assert step(restored.core, restart_at - 1) == expected[restart_at - 1]  # a retry
    for index in range(restart_at, len(expected)):
        assert step(restored.core, index) == expected[index], index
    restored.close()
    keeper.close()


def outcome(entry) -> tuple:
    """What a finished sequence or group reports: its result and its last answer."""
    if isinstance(entry, Group):
        return entry.hypotheses(), entry.answers(), entry.step_number, entry.last_record
    return list(entry.output_ids), entry.finish_reason, entry.last_record


@pytest.mark.parametrize("name", ["beam", "cot", "forks", "mirostat"])
def test_a_finished_sequence_keeps_its_result_until_released(tmp_path, name):
    expected = uninterrupted(name)
    keeper = started(tmp_path / "state")
    create(keeper.core, name)
    for index in range(len(expected)):
        step(keeper.core, index)
    assert finished(keeper.core)
    restored = started(killed(keeper, tmp_path))
    assert finished(restored.core)
    assert restored.core.read("s", outcome) == keeper.core.read("s", outcome)
    assert step(restored.core, len(expected) - 1) == expected[-1]  # the last step, retried
    restored.close()
    keeper.close()


def test_releases_and_idle_evictions_stay_done(tmp_path):
    now = [0.0]
    keeper = started(tmp_path / "state",
                     new_core(SequenceStore(idle_ttl_s=10, clock=lambda: now[0])))
    for sid in ("idle", "released", "kept"):
        create(keeper.core, "sample", sid)
    keeper.core.release(["released"])
    now[0] = 5.0
    step(keeper.core, 0, "kept")
    now[0] = 12.0
    create(keeper.core, "sample", "new")  # evicts "idle" (used at 0), not "kept" (at 5)
    restored = started(killed(keeper, tmp_path))
    assert sorted(e.sequence_id for e in restored.core.store.snapshot()) == ["kept", "new"]
    restored.close()
    keeper.close()


def test_a_sequence_moved_to_a_newer_version_restarts_on_it(tmp_path):
    """follow_latest: the step that moved the sequence journals the version it moved to; the
    restarted service (whose registry lacks the admin-put policy) rebuilds that version, with
    the request's override, and goes on as the uninterrupted run does."""
    live = {"chain": [{"temperature": {"temperature": 1.0}}], "select": "sample",
            "follow_latest": True, "overridable": ["temperature", "seed"]}
    newer = {**live, "chain": [{"temperature": {"temperature": 1.0}}, {"top_k": {"k": 5}}]}

    def run(core: SamplerCore, until: int) -> list:
        core.registry.put(parse_policy("live", live))
        core.create_sequences([SequenceRequest("s", policy="live", params={
            "temperature": 0.5, "seed": 9}, prompt_ids=(1, 2, 3))])
        records = []
        for index in range(until):
            if index == 2:
                core.registry.put(parse_policy("live", newer))
            records.append(step(core, index))
        return records

    expected = run(new_core(), STEPS)
    keeper = started(tmp_path / "state")
    assert run(keeper.core, 3) == expected[:3]
    restored = started(killed(keeper, tmp_path))
    policy = restored.core.read("s", lambda entry: entry.policy)
    assert policy.version == keeper.core.read("s", lambda entry: entry.policy.version)
    assert policy.version.number == 2 and dict(policy.overrides) == {"temperature": 0.5, "seed": 9}
    for index in range(3, STEPS):
        assert step(restored.core, index) == expected[index], index
    restored.close()
    keeper.close()


def test_the_pinned_policy_is_rebuilt_from_its_spec():
    """Flat parameters with a token-id map and the largest seed, and a shipped policy with
    overrides and follow_latest: the same stages, values, settings, version and overrides."""
    registry = PolicyRegistry.from_files()
    policies = [resolve_flat({"temperature": 0.7, "top_p": 0.9, "logit_bias": {50: -2.5},
                              "bad_words": [[7, 8]], "seed": 2 ** 64 - 1})]
    spec, version, _ = registry.get("creative")
    policies.append(resolve(spec, version, {"temperature": 0.3}))
    for policy in policies:
        rebuilt = SavedPolicy.of(policy).resolved()
        assert rebuilt.version == policy.version and rebuilt.split == policy.split
        assert [(l.stage.key, dict(l.values)) for l in rebuilt.links] == \
               [(l.stage.key, dict(l.values)) for l in policy.links]
        assert dict(rebuilt.selector.values) == dict(policy.selector.values)
        assert dict(rebuilt.settings) == dict(policy.settings)
        assert dict(rebuilt.overrides) == dict(policy.overrides)
        assert rebuilt.follow_latest == policy.follow_latest


# -- refusals -------------------------------------------------------------------------------------
def saved_directory(tmp_path: Path) -> Path:
    """A closed state directory holding sequence "s" after 3 steps (in its snapshot)."""
    keeper = started(tmp_path / "state")
    create(keeper.core, "sample")
    for index in range(3):
        step(keeper.core, index)
    keeper.close()
    return keeper.directory


def assert_refused(directory: Path, caplog, words: str) -> None:
    with caplog.at_level(logging.ERROR, "sampler_service.server.state_keeper"):
        keeper = started(directory)
    assert len(keeper.core.store) == 0
    assert any(words in r.getMessage() and "starts empty" in r.getMessage()
               for r in caplog.records), caplog.text
    assert list(directory.glob("snapshot.corrupt-*"))
    keeper.close()  # starts over with a snapshot of its own, readable again
    assert read_snapshot(directory / "snapshot").payloads == []


def test_a_foreign_snapshot_is_refused(tmp_path, caplog):
    directory = saved_directory(tmp_path)
    (directory / "snapshot").write_bytes(b"PK\x03\x04 not ours at all")
    assert_refused(directory, caplog, "not a sampler-service snapshot file")


def test_a_snapshot_of_another_format_version_is_refused(tmp_path, caplog):
    directory = saved_directory(tmp_path)
    data = bytearray((directory / "snapshot").read_bytes())
    data[8:12] = struct.pack("<I", FORMAT_VERSION + 1)
    (directory / "snapshot").write_bytes(bytes(data))
    assert_refused(directory, caplog, f"format version {FORMAT_VERSION + 1}")


def test_a_corrupt_snapshot_is_refused(tmp_path, caplog):
    directory = saved_directory(tmp_path)
    data = bytearray((directory / "snapshot").read_bytes())
    data[-5] ^= 0xFF
    (directory / "snapshot").write_bytes(bytes(data))
    assert_refused(directory, caplog, "fails its CRC")


def test_a_snapshot_frame_that_does_not_parse_is_refused(tmp_path, caplog):
    directory = saved_directory(tmp_path)
    write_snapshot(directory / "snapshot", 1, [b"\xff\xff\xff"])
    assert_refused(directory, caplog, "frame 0: not a SavedSequence message")


def test_a_journal_corrupt_before_its_end_is_refused(tmp_path, caplog):
    keeper = started(tmp_path / "state")
    create(keeper.core, "sample")
    for index in range(3):
        step(keeper.core, index)
    directory = killed(keeper, tmp_path)
    keeper.close()
    (generation, path), = journals(directory)
    data = bytearray(path.read_bytes())
    data[30] ^= 0xFF  # inside the first frame (the creation); frames follow it
    path.write_bytes(bytes(data))
    assert_refused(directory, caplog, "and more bytes follow it")


def test_a_torn_journal_tail_is_ignored(tmp_path, caplog):
    """The last append cut short (the process killed in its write): the changes before it are
    restored, the torn one (never answered) is not, and a log line says so."""
    expected = uninterrupted("sample")
    keeper = started(tmp_path / "state")
    create(keeper.core, "sample")
    for index in range(4):
        step(keeper.core, index)
    directory = killed(keeper, tmp_path)
    keeper.close()
    (_, path), = journals(directory)
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with caplog.at_level(logging.WARNING, "sampler_service.server.state_keeper"):
        restored = started(directory)
    assert any("torn tail" in r.getMessage() for r in caplog.records), caplog.text
    for index in range(3, len(expected)):  # step 3 was torn: it runs again
        assert step(restored.core, index) == expected[index]
    restored.close()


def test_a_sequence_whose_policy_cannot_be_rebuilt_is_skipped(tmp_path, caplog):
    """A stage no longer installed (a plug-in removed): that sequence is skipped with a log
    line naming it, the others are restored."""
    keeper = started(tmp_path / "state")
    create(keeper.core, "sample", "good")
    create(keeper.core, "mirostat", "orphan")
    saved = keeper.core.checkpoint()
    keeper.close()
    for item in saved:
        if item.sequence_id == "orphan":
            item.policy = SavedPolicy(item.policy.name, PolicyVersion(1, "gone"),
                                      {**item.policy.spec, "select": {"uninstalled": {}}})
    write_snapshot(keeper.directory / "snapshot", 9, [sequence_bytes(s) for s in saved])
    with caplog.at_level(logging.WARNING, "sampler_service.service"):
        restored = started(keeper.directory)
    assert [e.sequence_id for e in restored.core.store.snapshot()] == ["good"]
    assert any("'orphan' not restored" in r.getMessage() and "uninstalled" in r.getMessage()
               for r in caplog.records), caplog.text
    restored.close()


def test_a_failed_journal_write_empties_the_directory_until_the_next_snapshot(
        tmp_path, monkeypatch, caplog):
    """A full disk: the step is answered, the state files go (a restart would otherwise bring
    the sequence back behind its client), and the next snapshot starts over."""
    expected = uninterrupted("sample")
    keeper = started(tmp_path / "state")
    create(keeper.core, "sample")
    step(keeper.core, 0)

    def full(self, payloads):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch, caplog.at_level(logging.ERROR):
        patch.setattr(JournalFile, "append", full)
        assert step(keeper.core, 1) == expected[1]
    assert "append failed" in caplog.text
    assert sorted(os.listdir(keeper.directory)) == ["lock"]
    assert step(keeper.core, 2) == expected[2]  # not journaled, nothing to write to
    keeper.snapshot()
    assert step(keeper.core, 3) == expected[3]
    restored = started(killed(keeper, tmp_path))
    for index in range(4, STEPS):
        assert step(restored.core, index) == expected[index]
    restored.close()
    keeper.close()


def test_snapshots_come_every_interval(tmp_path):
    """The periodic snapshot moves the journal on a generation and deletes the older one."""
    keeper = StateKeeper(tmp_path / "state", new_core(), interval_s=0.01)
    keeper.restore()
    keeper.start()
    create(keeper.core, "sample")
    first = journals(keeper.directory)[0][0]
    while journals(keeper.directory)[0][0] == first:  # the next snapshot; no time is asserted
        threading.Event().wait(0.01)
    snapshot = read_snapshot(keeper.directory / "snapshot")  # replaced whole: never half written
    assert snapshot.generation > first and len(snapshot.payloads) == 1
    keeper.close()


def test_a_second_service_cannot_take_the_directory(tmp_path):
    keeper = started(tmp_path / "state")
    with pytest.raises(OSError, match="another service holds it"):
        StateKeeper(keeper.directory, new_core())
    keeper.close()


# -- files ----------------------------------------------------------------------------------------
def test_the_journal_reads_back_what_was_appended_and_reports_a_torn_tail(tmp_path):
    journal = JournalFile(tmp_path / "journal-4", 4, fsync=True)
    journal.append([b"one", b"two"])
    journal.append([b"three"])
    journal.close()
    contents = read_journal(tmp_path / "journal-4")
    assert (contents.generation, contents.payloads, contents.torn) == (4, [b"one", b"two",
                                                                           b"three"], "")
    with open(tmp_path / "journal-4", "ab") as file:
        file.write(frame(b"four")[:6])
    torn = read_journal(tmp_path / "journal-4")
    assert torn.payloads == [b"one", b"two", b"three"] and "incomplete frame header" in torn.torn


def test_a_snapshot_is_replaced_whole(tmp_path):
    path = tmp_path / "snapshot"
    write_snapshot(path, 2, [b"a", b"bc"])
    write_snapshot(path, 3, [b"d"])
    snapshot = read_snapshot(path)
    assert (snapshot.generation, snapshot.payloads) == (3, [b"d"])
    assert path.read_bytes().startswith(SNAPSHOT_MAGIC)
    assert sorted(os.listdir(tmp_path)) == ["snapshot"]


def test_a_record_file_round_trips_and_refuses_damage(tmp_path):
    from sampler_service.state.snapshot import StateFileError, read_record, write_record
    path = tmp_path / "record"
    write_record(path, b"payload")
    assert read_record(path) == b"payload" and oct(path.stat().st_mode & 0o777) == "0o600"
    data = path.read_bytes()
    for damaged in (data[:-1], data[:-1] + b"?", b"SMPLSNAP" + data[8:], data + data[-12:]):
        path.write_bytes(damaged)
        with pytest.raises(StateFileError):
            read_record(path)
