"""Pod rehearsal: the `cpu` overlay's sampler container, as rendered by kubectl kustomize, run
as a local process, and used the way the pod uses it.

From the rendered manifest come the sampler's command, args, env and probes, the worker's
SAMPLER_TARGET and SAMPLER_TRANSPORT, the volumes and the ConfigMap. Only what must change to
run unprivileged on a dev machine is rewritten, by `rewrite_flags` and `local_env`: every path
(a flag's or an environment variable's) moves onto a directory standing for the volume that
holds it, and every port onto a free one. /dev/shm needs no rewrite: shared-memory objects
are named, not given as paths, and both sides use this machine's /dev/shm. Environment taken
from a resource (limits.cpu) is resolved as the kubelet resolves it. A flag the rewrite does not know fails the test, and the
rewrite is checked to cover every path and port flag of the service's parser, so a new one in
the manifest or the CLI cannot slip through unmapped.

Then, as in the pod: the startup probe gates the worker, a reference worker (the SDK) creates
and steps a sequence over the Unix socket with shared memory, every probe answers,
/metrics answers on the annotated port, the policies ConfigMap is updated the kubelet's way
(a `..data` symlink swapped to a new timestamped directory) and the service picks the new
policy up, and SIGTERM stops it with exit 0 within --grace.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path, PurePosixPath

import grpc
import pytest
import torch
import yaml

from deploy import check_manifests as cm
from sampler_client import NotFoundError, SamplerClient
from sampler_client.health import SERVING, HealthCheckRequest, check_method
from sampler_service.cli import build_parser

#: Flags whose value is a path in the container: rewritten onto the local volume directories.
PATH_FLAGS = frozenset({"--uds", "--policies", "--state-dir", "--tls-cert", "--tls-key",
                        "--tls-client-ca", "--admin-token-file"})
#: NAME=PATH flags: the PATH part is rewritten.
NAMED_PATH_FLAGS = frozenset({"--tokenizer"})
#: Flags whose value is a TCP port: rewritten onto free local ports.
PORT_FLAGS = frozenset({"--port", "--health-port", "--metrics-port"})
#: The policy the rehearsal adds to the ConfigMap.
NEW_POLICY = "rehearsal-greedy"
#: Margin over --grace for the exit after SIGTERM (interpreter and thread shutdown).
STOP_MARGIN_S = 5.0


def serve_options() -> dict[str, argparse.Action]:
    """`sampler-service serve`'s options, by option string, from the service's own parser."""
    subcommands = next(a for a in build_parser()._actions
                       if isinstance(a, argparse._SubParsersAction))
    return {option: action for action in subcommands.choices["serve"]._actions
            for option in action.option_strings}


def takes_path(action: argparse.Action) -> bool:
    """Whether an option's value is (or holds) a file-system path."""
    return action.type is Path or any(word in str(action.metavar or "")
                                      for word in ("PATH", "FILE", "DIR"))


def takes_port(action: argparse.Action) -> bool:
    return action.dest == "port" or action.dest.endswith("_port")


# -- the local stand-in for the pod ------------------------------------------------------------
@dataclass
class LocalPod:
    """Where the pod's volumes and ports are on this machine."""
    root: Path
    volumes: dict[str, Path] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)

    def path(self, container: dict, pod_path: str) -> str:
        """A container's path on the directory of the volume that holds it; a path on no volume
        fails (the sampler's root file system is read-only)."""
        mount = cm.mount_for(container, pod_path)
        assert mount is not None, f"{container['name']}: {pod_path} is on no volume"
        relative = PurePosixPath(pod_path).relative_to(mount["mountPath"])
        return str(self.volumes[mount["name"]] / relative)

    def port(self, port: int | str) -> int:
        assert int(port) in self.ports, f"port {port} was never mapped"
        return self.ports[int(port)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_configmap(directory: Path, data: dict[str, str], stamp: str) -> None:
    """Writes (or updates) a ConfigMap volume the kubelet's way: the files in a new timestamped
    directory `..STAMP`, `..data` a symlink to it swapped in by an atomic rename, each key a
    symlink through `..data`; the previous timestamped directory is then removed."""
    directory.mkdir(parents=True, exist_ok=True)
    fresh = directory / f"..{stamp}"
    fresh.mkdir()
    for key, text in data.items():
        (fresh / key).write_text(text)
    data_link = directory / "..data"
    previous = os.readlink(data_link) if data_link.is_symlink() else None
    (directory / "..data_tmp").symlink_to(fresh.name)
    os.replace(directory / "..data_tmp", data_link)
    for key in data:
        if not (directory / key).is_symlink():
            (directory / key).symlink_to(Path("..data") / key)
    if previous:
        shutil.rmtree(directory / previous)


def lay_out_volumes(pod: cm.PodTemplate, docs: list[dict], root: Path) -> LocalPod:
    """A directory per volume of the pod: emptyDirs empty, configMaps written as the kubelet
    writes them from the rendered ConfigMap."""
    local = LocalPod(root)
    for volume in pod.spec["volumes"]:
        directory = root / "volumes" / volume["name"]
        local.volumes[volume["name"]] = directory
        if "configMap" in volume:
            write_configmap(directory, configmap(docs, volume["configMap"]["name"])["data"],
                            "2026_01_01_00_00_00.000000001")
        else:
            assert "emptyDir" in volume, f"volume {volume['name']}: no local stand-in"
            directory.mkdir(parents=True)
    return local


def configmap(docs: list[dict], name: str) -> dict:
    return next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)


# -- the rewrite -------------------------------------------------------------------------------
def split_flags(argv: list[str], options: dict[str, argparse.Action]
                ) -> list[tuple[str, str | None]]:
    """(flag, value) pairs of `--flag=value`, `--flag value` and valueless flags; an option
    the service does not know fails."""
    pairs, rest = [], list(argv)
    while rest:
        token = rest.pop(0)
        flag, equals, value = token.partition("=")
        assert flag in options, f"{flag}: not an option of `sampler-service serve`"
        if equals:
            pairs.append((flag, value))
        elif options[flag].nargs == 0:
            pairs.append((flag, None))
        else:
            pairs.append((flag, rest.pop(0)))
    return pairs


def rewrite_flags(container: dict, local: LocalPod) -> list[str]:
    """The container's command + args, runnable here: paths onto the volume directories, ports
    onto free ones, every other flag as it is. Ends with an assertion that no absolute path is
    left pointing outside the local pod."""
    argv = [*container["command"], *container.get("args", [])]
    assert argv[:2] == ["sampler-service", "serve"], argv[:2]
    rewritten = []
    for flag, value in split_flags(argv[2:], serve_options()):
        if flag in PATH_FLAGS:
            value = local.path(container, value)
        elif flag in NAMED_PATH_FLAGS:
            name, _, path = value.partition("=")
            value = f"{name}={local.path(container, path)}"
        elif flag in PORT_FLAGS:
            local.ports.setdefault(int(value), free_port())
            value = str(local.port(value))
        rewritten.append(flag if value is None else f"{flag}={value}")
    for token in rewritten:
        for part in token.split("=")[1:]:
            assert not part.startswith("/") or part.startswith(str(local.root)), \
                f"{token}: an absolute path left unmapped"
    return [*service_command(), "serve", *rewritten]


def service_command() -> list[str]:
    """`sampler-service` of this interpreter's environment (the console script the image runs,
    or the same entry point through -m)."""
    script = Path(sys.executable).parent / "sampler-service"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sampler_service"]


def quantity(text: str) -> Fraction:
    """A Kubernetes resource quantity ("2", "500m", "1.5", "4Gi", "1e3") as a number."""
    suffixes = {"m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix):
            return Fraction(text[:-len(suffix)]) * suffixes[suffix]
    return Fraction(text)


def resource_field(container: dict, reference: dict) -> str:
    """env valueFrom.resourceFieldRef as the kubelet resolves it: the container's limit (or
    request) divided by `divisor` (default 1), rounded up. An unset limit would be the node's
    allocatable, which the rehearsal does not model: it fails."""
    assert reference.get("containerName", container["name"]) == container["name"]
    kind, _, resource = reference["resource"].partition(".")
    amount = container.get("resources", {}).get(kind, {}).get(resource)
    assert amount is not None, f"{reference['resource']} is not set on {container['name']}"
    return str(math.ceil(quantity(str(amount)) / quantity(str(reference.get("divisor", "1")))))


def local_env(container: dict, local: LocalPod) -> dict[str, str]:
    """This process's environment plus the container's: absolute paths onto the volume
    directories, resourceFieldRef resolved; any other valueFrom fails."""
    env = dict(os.environ)
    for entry in container.get("env", []):
        if "value" in entry:
            value = str(entry["value"])
            env[entry["name"]] = local.path(container, value) if value.startswith("/") else value
        else:
            source = entry.get("valueFrom", {})
            assert set(source) == {"resourceFieldRef"}, f"env {entry['name']}: {source}"
            env[entry["name"]] = resource_field(container, source["resourceFieldRef"])
    return env


def worker_target(worker: dict, local: LocalPod) -> str:
    """The worker's SAMPLER_TARGET through the worker's own mounts (or ports)."""
    target = cm.env_value(worker, "SAMPLER_TARGET")
    if target.startswith("unix://"):
        return "unix://" + local.path(worker, target.removeprefix("unix://"))
    host, _, port = target.rpartition(":")
    return f"{host}:{local.port(port)}"


# -- what the pod does with it -----------------------------------------------------------------
def probe_passes(probe: dict, sampler: cm.Sampler, local: LocalPod) -> bool:
    """One try of a probe as the kubelet makes it (127.0.0.1 standing for the pod IP)."""
    timeout = probe.get("timeoutSeconds", 1)
    if "grpc" in probe:
        with grpc.insecure_channel(f"127.0.0.1:{local.port(probe['grpc']['port'])}") as channel:
            try:
                answer = check_method(channel)(
                    HealthCheckRequest(service=probe["grpc"].get("service", "")), timeout=timeout)
            except grpc.RpcError:
                return False
            return answer.status == SERVING
    if "httpGet" in probe:
        port = local.port(sampler.resolve(probe["httpGet"]["port"]))
        return http_get(port, probe["httpGet"].get("path", "/"), timeout)[0] < 400
    port = local.port(sampler.resolve(probe["tcpSocket"]["port"]))
    with socket.socket() as connection:
        connection.settimeout(timeout)
        return connection.connect_ex(("127.0.0.1", port)) == 0


def http_get(port: int, path: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except OSError:
        return 599, ""


def wait_for_startup(process: subprocess.Popen, probe: dict, sampler: cm.Sampler,
                     local: LocalPod, log: Path) -> None:
    """Polls the startup probe at its period until it passes, within its failure budget (at
    most 60 s here); fails with the service's log if it exits or never passes."""
    budget = min(probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3), 60)
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        assert process.poll() is None, \
            f"the sampler exited {process.returncode}:\n{log.read_text()}"
        if probe_passes(probe, sampler, local):
            return
        time.sleep(0.2)
    pytest.fail(f"startupProbe did not pass within {budget} s:\n{log.read_text()}")


def with_new_policy(policies_yaml: str) -> str:
    """The ConfigMap's policies.yaml plus NEW_POLICY (greedy, with a temperature stage)."""
    document = yaml.safe_load(policies_yaml)
    document["policies"][NEW_POLICY] = {
        "description": "Added by the pod rehearsal's ConfigMap update.",
        "chain": [{"temperature": {"temperature": 0.5}}], "select": "greedy"}
    return yaml.safe_dump(document, sort_keys=False)


def wait_for_policy(client: SamplerClient, name: str, timeout: float, log: Path):
    """A sequence of policy `name`, created as soon as the service knows it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.create_sequence(policy=name)
        except NotFoundError:
            if time.monotonic() > deadline:
                pytest.fail(f"policy {name} not loaded within {timeout} s:\n{log.read_text()}")
            time.sleep(0.2)


@pytest.fixture
def rendered_cpu() -> list[dict]:
    """The cpu overlay's documents, rendered by kubectl kustomize (a skip without kubectl)."""
    if cm.default_kubectl() is None:
        pytest.skip("kubectl is not installed")
    return cm.render(cm.Variant("cpu"))


def test_the_rewrite_covers_every_path_and_port_flag_of_the_service():
    """A new path or port option of `sampler-service serve` must be added to the rewrite (else
    a manifest using it would run against this machine's paths or the pod's ports)."""
    options = serve_options()
    assert {o for o, a in options.items() if takes_path(a)} == PATH_FLAGS | NAMED_PATH_FLAGS
    assert {o for o, a in options.items() if takes_port(a)} == PORT_FLAGS


def test_an_unknown_flag_or_a_path_on_no_volume_fails_the_rewrite(rendered_cpu, tmp_path):
    """The rewrite fails loudly rather than running a flag it cannot place."""
    pod = cm.pod_templates(rendered_cpu)[0]
    sampler = cm.find_sampler(pod).container
    local = lay_out_volumes(pod, rendered_cpu, tmp_path)
    with pytest.raises(AssertionError, match="not an option"):
        rewrite_flags({**sampler, "args": ["--device=cpu", "--new-flag=1"]}, local)
    with pytest.raises(AssertionError, match="on no volume"):
        rewrite_flags({**sampler, "args": ["--tls-cert=/etc/ssl/cert.pem"]}, local)


def test_resource_fields_resolve_as_the_kubelet_does():
    """limit / divisor, rounded up: 1500m CPUs are 2 threads, 1500 millicores; 1Gi is 1024Mi."""
    container = {"name": "c", "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}}}
    assert resource_field(container, {"resource": "limits.cpu"}) == "2"
    assert resource_field(container, {"resource": "limits.cpu", "divisor": "1m"}) == "1500"
    assert resource_field(container, {"resource": "limits.memory", "divisor": "1Mi"}) == "1024"


def test_the_cpu_pod_rehearsed_locally(rendered_cpu, tmp_path):
    """Start, serve the worker over the socket and shared memory, answer every probe and
    /metrics, hot-reload a ConfigMap update, stop on SIGTERM within --grace."""
    pod = cm.pod_templates(rendered_cpu)[0]
    sampler = cm.find_sampler(pod)
    worker = next(c for _, c in cm.workers(pod))
    local = lay_out_volumes(pod, rendered_cpu, tmp_path)
    argv, env = rewrite_flags(sampler.container, local), local_env(sampler.container, local)
    assert env["OMP_NUM_THREADS"] == "2"  # limits.cpu 2, divisor 1
    log = tmp_path / "sampler.log"
    with log.open("w") as output:
        process = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=output,
                                   stderr=subprocess.STDOUT)
    try:
        wait_for_startup(process, sampler.container["startupProbe"], sampler, local, log)
        rehearse_the_pod(pod, sampler, worker, local, log, rendered_cpu)
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=sampler.flags.grace + STOP_MARGIN_S) == 0, log.read_text()
        assert time.monotonic() - stopped < sampler.flags.grace + STOP_MARGIN_S
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert list(Path(env["NUMBA_CACHE_DIR"]).rglob("*.nbi")), "no kernel cached in NUMBA_CACHE_DIR"
    assert (Path(local.path(sampler.container, str(sampler.flags.state_dir))) / "snapshot").exists()


def rehearse_the_pod(pod: cm.PodTemplate, sampler: cm.Sampler, worker: dict, local: LocalPod,
                     log: Path, docs: list[dict]) -> None:
    """What the pod does with a started sampler (see the test's docstring)."""
    transport = cm.env_value(worker, "SAMPLER_TRANSPORT") or "auto"
    with SamplerClient(worker_target(worker, local), transport=transport) as client:
        sequence = client.create_sequence(policy="creative", prompt_ids=[1, 2, 3], seed=7)
        for _ in range(3):
            assert 0 <= sequence.step(torch.randn(1000)).token_id < 1000
        assert [r.kind for r in client.regions()] == ["system"]  # logits by shared memory
        for name in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe_passes(sampler.container[name], sampler, local), name
        port, path = pod.annotations["prometheus.io/port"], pod.annotations["prometheus.io/path"]
        status, metrics = http_get(local.port(port), path, 5)
        assert status == 200 and re.search(
            r'^sampler_rows_total\{[^}]*policy="creative"[^}]*\} 3(\.0)?$', metrics, re.M), metrics
        with pytest.raises(NotFoundError):
            client.create_sequence(policy=NEW_POLICY)
        policies = next(v for v in pod.spec["volumes"] if "configMap" in v)
        data = configmap(docs, policies["configMap"]["name"])["data"]
        write_configmap(local.volumes[policies["name"]],
                        {**data, "policies.yaml": with_new_policy(data["policies.yaml"])},
                        "2026_01_01_00_05_00.000000002")
        added = wait_for_policy(client, NEW_POLICY, sampler.flags.policy_reload_interval + 10, log)
        assert added.step(torch.tensor([0.0, 3.0, 1.0])).token_id == 1
