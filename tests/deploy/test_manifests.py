"""deploy/check_manifests.py on the shipped overlays (rendered with kubectl kustomize, skipped
without kubectl), and on broken copies of the base's documents (plain dicts, no kubectl), so
that each kind of check is seen to fail when its rule is broken."""
from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from deploy import check_manifests as cm

BASE = cm.KUSTOMIZE / "base"
PODMONITOR = cm.KUSTOMIZE / "components" / "podmonitor" / "podmonitor.yaml"


def needs_kubectl() -> None:
    """Skips the calling test where kubectl (with kustomize) is not installed."""
    if cm.default_kubectl() is None:
        pytest.skip("kubectl is not installed")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture
def docs() -> list[dict]:
    """The base's Deployment and NetworkPolicy and the PodMonitor component, as written (each is
    a complete object; the checks below need no kustomize)."""
    return [load(BASE / "deployment.yaml"), load(BASE / "networkpolicy.yaml"), load(PODMONITOR)]


def pod_of(docs: list[dict]) -> cm.PodTemplate:
    return cm.pod_templates(docs)[0]


def container(docs: list[dict], name: str) -> dict:
    return next(c for _, c in pod_of(docs).containers() if c["name"] == name)


def problems(sections: list[cm.Section]) -> list[str]:
    return [p for s in sections for p in s.problems]


# -- the shipped overlays ----------------------------------------------------------------------
def test_the_overlays_are_the_three_pod_layouts():
    """cpu, gpu-shm and gpu-cuda-ipc; the old `gpu` overlay is gone (gpu-shm replaces it)."""
    assert cm.overlays() == ["cpu", "gpu-cuda-ipc", "gpu-shm"]


def test_schemas_are_checked_for_1_30_and_the_newest_kubernetes_validate_ships():
    """The newest version is discovered, not written down."""
    assert cm.kubernetes_versions() == ("1.30.0", kubernetes_validate.latest_version())


@pytest.mark.parametrize("variant", cm.variants(), ids=lambda v: v.name)
def test_every_overlay_passes_every_check(variant):
    """Each overlay, alone and with the PodMonitor component, renders and passes the schemas,
    Pod Security "restricted", the house rules and the port consistency checks."""
    needs_kubectl()
    docs, sections = cm.check_variant(variant)
    assert problems(sections) == []
    assert {"Deployment", "NetworkPolicy", "ConfigMap"} <= {d["kind"] for d in docs}
    assert ("PodMonitor" in {d["kind"] for d in docs}) == ("podmonitor" in variant.components)


def test_the_gpu_overlays_put_the_sampler_on_cuda_with_their_transport():
    """gpu-shm: the sampler's own GPU, shared memory; gpu-cuda-ipc: one shared GPU, CUDA IPC."""
    needs_kubectl()
    for overlay, transport, gpu in (("gpu-shm", "shm", "nvidia.com/gpu"),
                                    ("gpu-cuda-ipc", "cuda_ipc", "nvidia.com/gpu.shared")):
        docs = cm.render(cm.Variant(overlay))
        sampler, worker = container(docs, "sampler"), container(docs, "worker")
        assert cm.parse_sampler_flags(sampler).device == "cuda"
        assert cm.env_value(worker, "SAMPLER_TRANSPORT") == transport
        assert sampler["resources"]["limits"][gpu] == worker["resources"]["limits"][gpu] == 1
        assert sampler["image"].endswith(":0.1.0-cuda")


def test_the_dra_component_needs_a_kubernetes_newer_than_1_30():
    """components/dra-shared-gpu (one ResourceClaim for both containers) is valid for the newest
    Kubernetes and passes every other check there, but 1.30's schemas reject it: the reason it
    is an opt-in component and not an overlay the checker holds to 1.30."""
    needs_kubectl()
    docs = cm.render(cm.Variant("gpu-cuda-ipc", ("dra-shared-gpu",)))
    newest = (kubernetes_validate.latest_version(),)
    assert problems(cm.check_documents(docs, newest)) == []
    too_old = cm.check_schemas(docs, ("1.30.0",)).problems
    assert any("resourceClaimTemplateName" in p for p in too_old)
    assert any("ResourceClaimTemplate" in p and "not validated" in p for p in too_old)
    pod = pod_of(docs)
    assert [c["resources"]["claims"] for _, c in pod.containers()] == [[{"name": "gpu"}]] * 2


# -- the checks fail what breaks a rule --------------------------------------------------------
def test_the_base_documents_pass_the_checks_the_negative_tests_break(docs):
    """The starting point of the tests below: every check passes on the unmodified documents."""
    assert problems([cm.check_pod_security(docs), cm.check_house_rules(docs),
                     cm.check_ports(docs)]) == []


def test_a_probe_on_a_port_the_sampler_does_not_serve_fails(docs):
    """A probe on 8082, which no flag serves."""
    container(docs, "sampler")["readinessProbe"]["grpc"]["port"] = 8082
    found = cm.check_ports(docs).problems
    assert len(found) == 1 and "readinessProbe: port 8082" in found[0]
    assert "not served by the sampler's flags" in found[0]


def test_a_probe_on_the_loopback_data_port_fails(docs):
    """The kubelet dials the pod IP: a port bound to 127.0.0.1 never answers it."""
    container(docs, "sampler")["livenessProbe"]["grpc"]["port"] = 50051
    [found] = cm.check_ports(docs).problems
    assert "livenessProbe" in found and "loopback" in found


def test_a_probe_by_an_unknown_port_name_or_on_the_wrong_protocol_fails(docs):
    """A tcpSocket probe by a name no containerPort has; httpGet on the gRPC health port."""
    sampler = container(docs, "sampler")
    sampler["startupProbe"] = {"tcpSocket": {"port": "sampler-grpc"}}
    sampler["readinessProbe"] = {"httpGet": {"port": "sampler-health", "path": "/metrics"}}
    found = cm.probes_target_served_ports(pod_of(docs), cm.find_sampler(pod_of(docs)))
    assert any("'sampler-grpc' is not a named containerPort" in p for p in found)
    assert any("readinessProbe" in p and "not http" in p for p in found)


def test_moving_the_metrics_port_without_its_references_fails_each_reference(docs):
    """--metrics-port 9091 while the annotation, the containerPort (and through its name the
    PodMonitor and the NetworkPolicy) still say 9090."""
    command = container(docs, "sampler")["command"]
    command[command.index("--metrics-port=9090")] = "--metrics-port=9091"
    found = "\n".join(cm.check_ports(docs).problems)
    for reference in ("prometheus.io/port", "containerPort sampler-metrics",
                      "PodMonitor/model-worker-sampler", "NetworkPolicy/model-worker-sampler"):
        assert reference in found


def test_a_pod_monitor_port_that_is_not_a_container_port_name_fails(docs):
    """PodMonitor endpoints name container ports: "metrics" is not the sampler's."""
    docs[2]["spec"]["podMetricsEndpoints"][0]["port"] = "metrics"
    [found] = cm.check_ports(docs).problems
    assert "'metrics' is not a named containerPort of the sampler" in found


def test_a_network_policy_rule_without_ports_or_opening_metrics_to_all_fails(docs):
    """A rule with no ports opens every port; the metrics rule must name its sources."""
    ingress = docs[1]["spec"]["ingress"]
    ingress[1].pop("from")
    ingress.append({"from": [{"podSelector": {}}]})
    found = cm.check_ports(docs).problems
    assert any("the metrics port is open to every source" in p for p in found)
    assert any("ingress rule 2 has no ports" in p for p in found)


@pytest.mark.parametrize("where", ["pod", "container"])
def test_a_container_without_seccomp_fails_pod_security(docs, where):
    """No seccompProfile on the pod (nor on the containers), or Unconfined on one container."""
    pod = pod_of(docs)
    if where == "pod":
        del pod.spec["securityContext"]["seccompProfile"]
    else:
        container(docs, "worker")["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    found = cm.pss_seccomp(pod)
    assert found and all("worker" in p or "sampler" in p for p in found)
    assert len(found) == (2 if where == "pod" else 1)
    assert cm.check_pod_security(docs).problems == found


def _privileged(docs):
    container(docs, "worker")["securityContext"]["privileged"] = True


def _escalation(docs):
    del container(docs, "sampler")["securityContext"]["allowPrivilegeEscalation"]


def _capabilities(docs):
    container(docs, "worker")["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"]}


def _root(docs):
    container(docs, "sampler")["securityContext"]["runAsUser"] = 0


def _non_root(docs):
    del pod_of(docs).spec["securityContext"]["runAsNonRoot"]


def _host_path(docs):
    pod_of(docs).spec["volumes"].append({"name": "h", "hostPath": {"path": "/"}})


def _host_network(docs):
    pod_of(docs).spec["hostNetwork"] = True


def _host_port(docs):
    container(docs, "sampler")["ports"][0]["hostPort"] = 8081


def _sysctl(docs):
    pod_of(docs).spec["securityContext"]["sysctls"] = [{"name": "kernel.msgmax", "value": "1"}]


@pytest.mark.parametrize("breach, rule", [
    (_privileged, cm.pss_privileged), (_escalation, cm.pss_privilege_escalation),
    (_capabilities, cm.pss_capabilities), (_root, cm.pss_run_as_user),
    (_non_root, cm.pss_run_as_non_root), (_host_path, cm.pss_host_path),
    (_host_path, cm.pss_volume_types), (_host_network, cm.pss_host_namespaces),
    (_host_port, cm.pss_host_ports), (_sysctl, cm.pss_sysctls)],
    ids=lambda x: getattr(x, "__name__", "").lstrip("_"))
def test_each_breach_of_restricted_fails_its_control(docs, breach, rule):
    """One breach at a time: its control reports it, and so does the whole check."""
    breach(docs)
    assert rule(pod_of(docs))
    assert cm.check_pod_security(docs).problems


def test_a_writable_root_or_a_cache_on_the_root_file_system_fails(docs):
    """readOnlyRootFilesystem off; NUMBA_CACHE_DIR on no volume (read-only with the root)."""
    sampler = container(docs, "sampler")
    sampler["securityContext"]["readOnlyRootFilesystem"] = False
    next(e for e in sampler["env"] if e["name"] == "NUMBA_CACHE_DIR")["value"] = "/opt/numba"
    found = cm.check_house_rules(docs).problems
    assert any("readOnlyRootFilesystem is not true" in p for p in found)
    assert any("$NUMBA_CACHE_DIR /opt/numba is on the read-only root file system" in p
               for p in found)


def test_policies_through_a_sub_path_mount_fail(docs):
    """A subPath mount is a copy the kubelet never updates: hot reload would not see edits."""
    mount = next(m for m in container(docs, "sampler")["volumeMounts"] if m["name"] == "policies")
    mount.update(mountPath="/etc/sampler/policies/policies.yaml", subPath="policies.yaml")
    [found] = cm.check_house_rules(docs).problems
    assert "not in a configMap directory mount" in found


def test_a_worker_target_other_than_the_socket_or_shm_not_shared_fails(docs):
    """SAMPLER_TARGET names another socket; the worker does not mount the shared /dev/shm."""
    worker = container(docs, "worker")
    worker["env"][0]["value"] = "unix:///run/other/sampler.sock"
    worker["volumeMounts"] = [m for m in worker["volumeMounts"] if m["name"] != "shm"]
    found = cm.check_house_rules(docs).problems
    assert any("is not the sampler's --uds" in p for p in found)
    assert any("containers/worker: /dev/shm is not a volume mount" in p for p in found)


def test_flags_the_service_does_not_accept_fail(docs):
    """The command is parsed by the service's own parser: a misspelt flag fails."""
    container(docs, "sampler")["command"].append("--metrics-prot=9090")
    [found] = cm.check_house_rules(docs).problems
    assert "command/args do not parse" in found and "--metrics-prot" in found


def test_an_unknown_field_fails_the_strict_schema_of_both_versions(docs):
    """A misspelt field (readOnlyRootFileSystem) fails strict validation for 1.30 and the newest."""
    container(docs, "sampler")["securityContext"]["readOnlyRootFileSystem"] = True
    found = cm.check_schemas(docs[:1]).problems
    assert len(found) == 2
    assert all("'readOnlyRootFileSystem' was unexpected" in p for p in found)


def test_a_misspelt_pod_monitor_field_fails_its_own_schema(docs):
    """kubernetes-validate has no PodMonitor schema: the checker's own catches the typo."""
    spec = docs[2]["spec"]
    spec["podMetricEndpoints"] = spec.pop("podMetricsEndpoints")
    found = cm.check_schemas(docs[2:]).problems
    assert any("'podMetricsEndpoints' is a required property" in p for p in found)
    assert any("'podMetricEndpoints' was unexpected" in p for p in found)


def test_a_kind_without_any_schema_fails_rather_than_passing_unchecked():
    """`kubernetes-validate --strict` only warns about a kind it has no schema for."""
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
               "metadata": {"name": "x"}, "spec": {}}
    found = cm.check_schemas([monitor]).problems
    assert len(found) == 2 and all("not validated" in p for p in found)


def test_label_selectors_follow_kubernetes():
    """matchLabels and matchExpressions, ANDed; an empty selector selects everything."""
    labels = {"app": "a", "tier": "t"}
    assert cm.selects({"matchLabels": {"app": "a"}}, labels)
    assert not cm.selects({"matchLabels": {"app": "b"}}, labels)
    assert cm.selects({"matchExpressions": [{"key": "tier", "operator": "In",
                                             "values": ["t", "u"]}]}, labels)
    assert not cm.selects({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]},
                          labels)
    assert cm.selects({}, labels)


def test_the_checker_exits_0_and_reports_every_variant(capsys):
    """The command line: every variant reported ok, exit 0."""
    needs_kubectl()
    assert cm.main([]) == 0
    out = capsys.readouterr().out
    assert all(f"{v.name}: ok" in out for v in cm.variants())
    assert "Kubernetes 1.30.0 and" in out
    assert "PodMonitor/model-worker-sampler against its own schema" in out
