"""Hot reload of the policy file: pinned versions, atomic swaps, rejected files (hostile ones
too: not UTF-8, an alias bomb, over the size cap), ConfigMap symlink swaps, follow_latest."""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from grpc_health.v1 import health_pb2

from sampler_client import SamplerClient
from tests.service.test_connections import health_check
from tests.service.test_metrics import scrape
from tests.unit.policy.test_files import ALIAS_BOMB

VOCAB = 32
STEPS = 12
OLD = """
policies:
  p:
    chain: [{temperature: {temperature: 0.5}}, {top_k: {k: 6}}]
    select: sample
    overridable: [seed]
"""
NEW = OLD.replace("0.5", "1.7")
FOLLOWING = OLD.replace("    overridable: [seed]", "    overridable: [seed]\n    follow_latest: true")


def logits_at(step: int) -> torch.Tensor:
    return torch.randn(16, VOCAB, generator=torch.Generator().manual_seed(step))


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def version_of(server, name: str = "p") -> int:
    return server.core.registry.entry(name).version.number


def run(address: str, edit=None) -> list[list[int]]:
    """16 seeded sequences of `p` stepped STEPS times; `edit()` starts midway in another thread
    while the steps go on, and has returned before the last three steps."""
    with SamplerClient(address) as client:
        sequences = client.create_sequences([dict(policy="p", seed=i) for i in range(16)])
        editor = threading.Thread(target=edit) if edit else None
        outputs: list[list[int]] = [[] for _ in sequences]
        for step in range(STEPS):
            if editor and step == STEPS // 2:
                editor.start()
            if editor and step == STEPS - 3:
                editor.join()
            for out, choice in zip(outputs, client.step(sequences, logits_at(step))):
                out.append(choice.token_id)
        return outputs


@pytest.fixture
def policy_file(tmp_path) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(OLD)
    return path


def test_running_sequences_keep_their_version_while_the_file_changes(start_server, policy_file,
                                                                     tmp_path):
    reference = run(start_server(policies=policy_file, policy_reload_s=0).address)
    server = start_server(policies=policy_file, policy_reload_s=0.02)

    def edit():
        policy_file.write_text(NEW)
        wait_for(lambda: version_of(server) == 2)

    assert run(server.address, edit) == reference  # pinned: tokens unchanged by the reload
    with SamplerClient(server.address) as client:
        info = client.create_sequence(policy="p", seed=0).info()
    assert info.policy_version[0] == 2
    assert info.resolved_spec["chain"][0]["temperature"]["temperature"] == pytest.approx(1.7)


def test_a_broken_file_is_rejected_whole_and_reported(start_server, policy_file):
    server = start_server(policies=policy_file, policy_reload_s=0.02, metrics_port=0)
    policy_file.write_text(OLD.replace("{k: 6}", "{k: -6}"))  # top_k.k out of range
    wait_for(lambda: scrape(server).get('sampler_policy_reloads_total{result="error"}') == 1)
    assert version_of(server) == 1
    with SamplerClient(server.address) as client:  # the old policy keeps serving
        assert client.create_sequence(policy="p", seed=1).info().policy_version[0] == 1
    policy_file.write_text(NEW)  # a fixed file is picked up
    wait_for(lambda: version_of(server) == 2)
    assert scrape(server)['sampler_policy_reloads_total{result="ok"}'] == 1


def test_hostile_files_are_counted_and_logged_and_the_next_edit_serves(start_server, tmp_path,
                                                                       caplog):
    """A non-UTF-8 file, a YAML alias bomb and a 20 MB file swapped into the watched directory
    in turn: each reload fails alone (counted, logged with the file, the gauge at 1) while the
    old policy keeps serving and health says SERVING; then a valid edit serves within two
    reload intervals and the gauge goes back to 0."""
    interval = 0.2
    watched = tmp_path / "policies"
    watched.mkdir()
    target = watched / "policies.yaml"
    target.write_text(OLD)
    server = start_server(policies=watched, policy_reload_s=interval, metrics_port=0)
    assert scrape(server)["sampler_policy_reload_failing"] == 0

    def swap_in(content: bytes) -> None:
        """Atomically, as kubelet does (dot-files are never read as policies)."""
        staged = watched / ".staged"
        staged.write_bytes(content)
        os.replace(staged, target)

    hostile = ((b"policies:\n  caf\xe9: {select: greedy}\n", "not UTF-8: byte 0xe9 at line 2"),
               (ALIAS_BOMB.encode(), "YAML aliases would repeat more than"),
               (b"#" * 20_000_000, "20000000 bytes, over the 1048576-byte cap"))
    for errors, (content, says) in enumerate(hostile, 1):
        swap_in(content)
        wait_for(lambda: scrape(server).get('sampler_policy_reloads_total{result="error"}')
                 == errors)
        assert scrape(server)["sampler_policy_reload_failing"] == 1
        logged = [r.getMessage() for r in caplog.records
                  if r.name == "sampler_service.policy.watcher" and r.levelno == logging.ERROR]
        assert len(logged) == errors and f"{target}: " in logged[-1] and says in logged[-1]
        assert server.watcher.is_alive()
        assert health_check(server.address) == health_pb2.HealthCheckResponse.SERVING
        assert version_of(server) == 1
    with SamplerClient(server.address) as client:  # the old policy keeps serving
        assert client.create_sequence(policy="p", seed=1).info().policy_version[0] == 1
    edited = time.monotonic()
    swap_in(NEW.encode())
    wait_for(lambda: version_of(server) == 2)
    assert time.monotonic() - edited < 2 * interval
    with SamplerClient(server.address) as client:
        assert client.create_sequence(policy="p", seed=1).info().policy_version[0] == 2
    samples = scrape(server)
    assert samples['sampler_policy_reloads_total{result="error"}'] == 3
    assert samples['sampler_policy_reloads_total{result="ok"}'] == 1
    assert samples["sampler_policy_reload_failing"] == 0
    assert server.watcher.is_alive()


def test_a_configmap_style_symlink_swap_is_picked_up(start_server, tmp_path):
    """kubelet's atomic update: files are symlinks through `..data`, which is re-pointed."""
    mount = tmp_path / "mount"
    mount.mkdir()
    for version, text in (("..2026_11_24_a", OLD), ("..2026_11_24_b", NEW)):
        (mount / version).mkdir()
        (mount / version / "policies.yaml").write_text(text)
    (mount / "..data").symlink_to("..2026_11_24_a")
    (mount / "policies.yaml").symlink_to("..data/policies.yaml")
    server = start_server(policies=mount, policy_reload_s=0.02)
    assert version_of(server) == 1
    (mount / "..data_tmp").symlink_to("..2026_11_24_b")
    os.replace(mount / "..data_tmp", mount / "..data")
    wait_for(lambda: version_of(server) == 2)
    spec = server.core.registry.entry("p").spec
    assert dict(spec.chain)["temperature"]["temperature"] == pytest.approx(1.7)


def test_follow_latest_sequences_move_to_the_new_version_at_their_next_step(start_server,
                                                                          policy_file):
    policy_file.write_text(FOLLOWING)
    server = start_server(policies=policy_file, policy_reload_s=0.02)
    with SamplerClient(server.address) as client:
        sequence = client.create_sequence(policy="p", seed=3)
        sequence.step(torch.randn(VOCAB))
        policy_file.write_text(FOLLOWING.replace("0.5", "1.7"))
        wait_for(lambda: version_of(server) == 2)
        assert sequence.info().policy_version[0] == 1  # moves only when it steps
        sequence.step(torch.randn(VOCAB))
        info = sequence.info()
    assert info.policy_version[0] == 2
    assert info.resolved_spec["chain"][0]["temperature"]["temperature"] == pytest.approx(1.7)


SPLIT = OLD + """
  q:
    chain: [{temperature: {temperature: 1.2}}]
    select: sample
  ab: {split: {p: 0.5, q: 0.5}}
"""


def test_a_split_assigns_each_id_one_variant_and_counts_them(start_server, policy_file):
    policy_file.write_text(SPLIT)
    server = start_server(policies=policy_file, metrics_port=0)
    ids = [f"user-{i}" for i in range(60)]
    with SamplerClient(server.address) as client:
        infos = [s.info() for s in client.create_sequences(
            [dict(policy="ab", sequence_id=i) for i in ids])]
        client.release(ids)
        again = [s.info() for s in client.create_sequences(
            [dict(policy="ab", sequence_id=i) for i in ids])]
    assert {i.split for i in infos} == {"ab"}
    assert [i.policy for i in infos] == [i.policy for i in again]  # deterministic by id
    chosen = [i.policy for i in infos]
    samples = scrape(server)
    for variant in ("p", "q"):
        assert samples[f'sampler_split_assignments_total{{split="ab",variant="{variant}"}}'] == (
            2 * chosen.count(variant))
    assert 0 < chosen.count("p") < 60
