"""The policy watcher never dies: each bad reload is rejected alone, reported and logged with
the file, and the next change is still picked up."""
from __future__ import annotations

import logging
import os
import time

from sampler_service.policy.files import MAX_POLICY_FILE_BYTES
from sampler_service.policy.registry import PolicyRegistry
from sampler_service.policy.watcher import PolicyWatcher
from tests.unit.policy.test_files import ALIAS_BOMB

OLD = "policies:\n  p: {chain: [{temperature: {temperature: 0.5}}], select: sample}\n"
NEW = OLD.replace("0.5", "1.5")


def temperature(registry: PolicyRegistry) -> float:
    return dict(registry.entry("p").spec.chain)["temperature"]["temperature"]


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_each_bad_file_is_rejected_alone_and_the_next_edit_loads(tmp_path, caplog):
    (tmp_path / "policies.yaml").write_text(OLD)
    registry = PolicyRegistry.from_files(tmp_path, include_defaults=False)
    reports = []
    watcher = PolicyWatcher(registry, tmp_path, include_defaults=False,
                            on_reload=lambda change, error: reports.append((change, error)))
    bad = tmp_path / "bad.yaml"
    writes = ((lambda: bad.write_bytes(b"policies: {caf\xe9: 1}\n"), "not UTF-8: byte 0xe9"),
              (lambda: bad.write_text(ALIAS_BOMB), "YAML aliases would repeat more"),
              (lambda: os.truncate(bad, MAX_POLICY_FILE_BYTES + 1), "-byte cap"))
    for attempts, (write, says) in enumerate(writes, 1):
        write()
        assert watcher.check() is None
        assert len(reports) == attempts
        change, error = reports[-1]
        assert change is None and error.startswith(f"{bad}: ") and says in error
        record = caplog.records[-1]
        assert record.levelno == logging.ERROR and record.exc_info is None
        assert str(bad) in record.getMessage() and says in record.getMessage()
        assert watcher.check() is None and len(reports) == attempts  # not retried unchanged
        assert temperature(registry) == 0.5  # the old policies keep serving
    bad.unlink()
    (tmp_path / "policies.yaml").write_text(NEW)
    change = watcher.check()
    assert change is not None and change.changed == ("p",) and reports[-1] == (change, None)
    assert temperature(registry) == 1.5


def test_a_failing_observer_or_a_file_name_that_is_not_utf8_does_not_end_the_thread(tmp_path,
                                                                                    caplog):
    """The observer raises on every report; a file whose name is not UTF-8 is watched (its
    name used to be encoded as UTF-8, which raised and ended the thread)."""
    (tmp_path / "policies.yaml").write_text(OLD)
    registry = PolicyRegistry.from_files(tmp_path, include_defaults=False)

    def observer(change, error):
        raise RuntimeError("observer broke")

    watcher = PolicyWatcher(registry, tmp_path, False, interval_s=0.01, on_reload=observer)
    watcher.start()
    try:
        odd = os.path.join(os.fsencode(tmp_path), b"q\xff.yaml")
        with open(odd, "wb") as file:
            file.write(OLD.replace("p:", "q:").encode())
        wait_for(lambda: "q" in registry.names())
        wait_for(lambda: "policy reload observer failed" in caplog.text)
        (tmp_path / "policies.yaml").write_text(NEW)
        wait_for(lambda: temperature(registry) == 1.5)
        assert watcher.is_alive()
    finally:
        watcher.stop()
    assert not watcher.is_alive()
