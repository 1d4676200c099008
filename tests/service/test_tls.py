"""TLS and mutual TLS on the TCP port (`--tls-cert/--tls-key/--tls-client-ca`) with the SDK's
`tls=TLSConfig(...)`, on certificates made here with the openssl CLI (skipped without it)."""
from __future__ import annotations

import asyncio
import shutil
import subprocess

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sampler_client import AsyncSamplerClient, SamplerClient, TLSConfig, UnavailableError
from sampler_service import cli
from sampler_service.server.app import ServerConfig, server_credentials

LOGITS = torch.tensor([0.5, 3.0, 1.0])


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(directory, name: str, subject: str, extensions: str) -> None:
    """name.key and name.pem, signed by ca.pem, with the given v3 extensions."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=directory)
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=directory)


def _self_signed(directory, name: str, subject: str, *extra: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", subject, *extra, cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA; a server certificate for localhost and 127.0.0.1 and a client certificate it
    signed; a self-signed client certificate it did not."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make test certificates")
    directory = tmp_path_factory.mktemp("pki")
    _self_signed(directory, "ca", "/CN=sampler test CA",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _issue(directory, "server", "/CN=localhost",
           "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _issue(directory, "client", "/CN=model-worker", "extendedKeyUsage=clientAuth\n")
    _self_signed(directory, "rogue", "/CN=rogue")
    return directory


def _tls_server(start_server, pki, mutual: bool = False, **overrides):
    return start_server(tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                        tls_client_ca=pki / "ca.pem" if mutual else None, **overrides)


def test_tls_step_end_to_end_with_shared_memory(start_server, pki):
    server = _tls_server(start_server, pki, health_port=0)
    assert server.tls == "TLS"
    with SamplerClient(server.address, tls=TLSConfig(root_ca=pki / "ca.pem")) as client:
        assert client.create_sequence(policy="greedy").step(LOGITS).token_id == 1
        # a TLS loopback target is still local: the logits went through shared memory
        assert client.regions()
    # the host name the certificate names works too, PEM bytes as well as paths
    tls = TLSConfig(root_ca=(pki / "ca.pem").read_bytes())
    with SamplerClient(f"localhost:{server.port}", tls=tls, transport="inline") as client:
        assert client.create_sequence(policy="greedy").step(LOGITS).token_id == 1
    # the separate health port stays plaintext: the kubelet's gRPC probe speaks no TLS
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_or_untrusting_client_is_refused(start_server, pki):
    server = _tls_server(start_server, pki)
    with SamplerClient(server.address, timeout=5) as client:
        with pytest.raises(UnavailableError):
            client.create_sequence(policy="greedy")
    with SamplerClient(server.address, timeout=5, tls=TLSConfig(root_ca=pki / "rogue.pem")) as client:
        with pytest.raises(UnavailableError):
            client.create_sequence(policy="greedy")


def test_mutual_tls_needs_a_client_certificate_the_ca_signed(start_server, pki):
    server = _tls_server(start_server, pki, mutual=True)
    assert server.tls == "mutual TLS"
    ca = pki / "ca.pem"
    with SamplerClient(server.address, timeout=5, tls=TLSConfig(root_ca=ca)) as client:
        with pytest.raises(UnavailableError):
            client.create_sequence(policy="greedy")
    rogue = TLSConfig(root_ca=ca, cert=pki / "rogue.pem", key=pki / "rogue.key")
    with SamplerClient(server.address, timeout=5, tls=rogue) as client:
        with pytest.raises(UnavailableError):
            client.create_sequence(policy="greedy")
    signed = TLSConfig(root_ca=ca, cert=pki / "client.pem", key=pki / "client.key")
    with SamplerClient(server.address, tls=signed) as client:
        assert client.create_sequence(policy="greedy").step(LOGITS).token_id == 1

    async def async_step() -> int:
        async with AsyncSamplerClient(server.address, tls=signed) as client:
            return (await (await client.create_sequence(policy="greedy")).step(LOGITS)).token_id

    assert asyncio.run(async_step()) == 1


def test_admin_cli_over_mutual_tls(start_server, pki, capsys):
    server = _tls_server(start_server, pki, mutual=True, admin_token="s3cret")
    remote = ["--target", server.address, "--token", "s3cret", "--tls-ca", str(pki / "ca.pem")]
    assert cli.main(["policies", "list", *remote, "--tls-cert", str(pki / "client.pem"),
                     "--tls-key", str(pki / "client.key")]) == 0
    assert "greedy" in capsys.readouterr().out
    assert cli.main(["policies", "list", *remote, "--timeout", "5"]) == 1  # no client cert
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert cli.main(["policies", "list", *remote, "--tls-cert", str(pki / "client.pem")]) == 2
    assert "--tls-key" in capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [
    (["--tls-cert", "{pki}/server.pem"], "--tls-cert needs --tls-key"),
    (["--tls-key", "{pki}/server.key"], "--tls-key needs --tls-cert"),
    (["--tls-client-ca", "{pki}/ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
    (["--tls-cert", "{pki}/missing.pem", "--tls-key", "{pki}/server.key"],
     "--tls-cert {pki}/missing.pem: cannot read"),
    (["--tls-cert", "{pki}/server.pem", "--tls-key", "{pki}/server.key",
      "--tls-client-ca", "{pki}/server.ext"], "--tls-client-ca {pki}/server.ext: not a PEM file"),
])
def test_cli_refuses_bad_tls_flags(pki, flags, named, capsys, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # serve() sets it; keep the test's env
    argv = ["serve", "--port", "0", "--device", "cpu", *(f.format(pki=pki) for f in flags)]
    assert cli.main(argv) == 2
    assert named.format(pki=pki) in capsys.readouterr().err


def test_tls_config_checks_its_arguments(pki):
    with pytest.raises(ValueError, match="cert and key go together"):
        TLSConfig(cert=pki / "client.pem")
    with pytest.raises(OSError, match="root_ca .*missing.pem"):
        SamplerClient("127.0.0.1:1", tls=TLSConfig(root_ca=pki / "missing.pem"))
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        with pytest.raises(ValueError, match="either channel or tls"):
            SamplerClient("127.0.0.1:1", channel=channel, tls=True)
    assert server_credentials(ServerConfig()) is None
