"""`sampler-service policies ...` as a user runs it: a subprocess, offline validation of policy
files, and list/show/put/delete against a running server through the admin token."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from sampler_client import PolicyAdminClient, SamplerClient

TOKEN = "cli-admin-token"
PRECISE = textwrap.dedent("""
    chain:
      - temperature: {temperature: 0.2}
      - top_k: {k: 5}
    select: sample
""")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sampler_service", "policies", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def admin_server(start_server):
    return start_server(admin_token=TOKEN)


@pytest.fixture
def remote(admin_server, tmp_path):
    """The options that reach the fixture's server with the token (from a file)."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # as a Secret mount may end it
    return ["--target", admin_server.address, "--token-file", str(token_file)]


def test_validate_prints_the_names_a_file_defines(tmp_path):
    path = tmp_path / "policies.yaml"
    path.write_text("policies:\n  precise:" + textwrap.indent(PRECISE, "    ")
                    + "  chat: {split: {precise: 0.7, creative: 0.3}}\n")
    result = cli("validate", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.strip() == f"{path}: precise, chat"


def test_validate_a_directory_lets_a_split_name_a_policy_of_another_file(tmp_path):
    (tmp_path / "a.yaml").write_text("policies:\n  chat: {split: {precise: 0.5, greedy: 0.5}}\n")
    (tmp_path / "b.yml").write_text("policies:\n  precise:" + textwrap.indent(PRECISE, "    "))
    (tmp_path / "notes.txt").write_text("not a policy file")
    result = cli("validate", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{tmp_path / 'a.yaml'}: chat",
                                          f"{tmp_path / 'b.yml'}: precise"]


@pytest.mark.parametrize("text, field", [
    ("policies:\n  precise:\n    chain: [{top_p: {p: 2}}]\n    select: sample\n",
     "policies.precise.chain[0].top_p.p"),
    ("policies:\n  chat: {split: {creative: 0.5, nowhere: 0.5}}\n", "policies.chat.split.nowhere"),
    ("policies: [\n", "policies"),
])
def test_validate_a_broken_file_exits_1_naming_the_file_and_field(tmp_path, text, field):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    result = cli("validate", str(path))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"{path}: {field}: ")


def test_validate_names_the_broken_file_of_a_directory(tmp_path):
    (tmp_path / "good.yaml").write_text("policies:\n  precise:" + textwrap.indent(PRECISE, "    "))
    (tmp_path / "worse.yaml").write_text("policies:\n  hot: {chain: [{temperature: {temperature: -1}}], select: sample}\n")
    result = cli("validate", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{tmp_path / 'worse.yaml'}: policies.hot.chain[0].temperature.temperature: ")
    missing = cli("validate", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_put_show_list_delete_through_the_cli(admin_server, remote, tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text(PRECISE)
    document = tmp_path / "document.yaml"
    document.write_text("policies:\n  precise:" + textwrap.indent(PRECISE, "    "))
    put = cli("put", "precise", str(bare), *remote)
    assert put.returncode == 0, put.stderr
    assert re.fullmatch(r"precise: version 1 \(\w+\)\n", put.stdout)
    assert cli("put", "precise", str(document), *remote).stdout == put.stdout  # same spec, same version

    show = cli("show", "precise", *remote)
    assert show.returncode == 0 and show.stdout.startswith("# version 1 (")
    assert yaml.safe_load(show.stdout)["policies"]["precise"]["chain"][1] == {"top_k": {"k": 5}}

    with SamplerClient(admin_server.address) as sampler:
        pinned = sampler.create_sequence(policy="precise")
        listed = cli("list", *remote)
        assert listed.returncode == 0
        row = next(line.split() for line in listed.stdout.splitlines() if line.startswith("precise "))
        assert row[:2] + row[4:] == ["precise", "policy", "admin", "1"]

        refused = cli("delete", "precise", *remote)
        assert refused.returncode == 1
        assert "FAILED_PRECONDITION" in refused.stderr and "(field: force)" in refused.stderr
        forced = cli("delete", "precise", "--force", *remote)
        assert forced.returncode == 0, forced.stderr
        assert "1 live sequence(s) keep running" in forced.stdout
        assert pinned.step(torch.tensor([0.0, 9.0, 1.0])).token_id == 1  # still stepping
    with PolicyAdminClient(admin_server.address, token=TOKEN) as admin:
        assert "precise" not in {p.name for p in admin.list_policies()}


def test_cli_errors_exit_nonzero_with_status_and_field(admin_server, remote, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("chain: [{top_p: {p: 2}}]\nselect: sample\n")
    put = cli("put", "precise", str(bad), *remote)
    assert put.returncode == 1
    assert "INVALID_ARGUMENT" in put.stderr and "spec.chain[0].top_p.p" in put.stderr
    unknown = cli("show", "nope", *remote)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    anonymous = cli("list", "--target", admin_server.address)
    assert anonymous.returncode == 1 and "UNAUTHENTICATED" in anonymous.stderr
    wrong = cli("list", "--target", admin_server.address, "--token", "guess")
    assert wrong.returncode == 1 and "PERMISSION_DENIED" in wrong.stderr
    wrong_name = cli("put", "other", str(tmp_path / "missing.yaml"), *remote)
    assert wrong_name.returncode == 2 and "missing.yaml" in wrong_name.stderr


def test_serve_reads_the_admin_token_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    process = subprocess.Popen([sys.executable, "-m", "sampler_service", "serve", "--port", "0",
                                "--device", "cpu", "--admin-token-file", str(token_file)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = re.search(r"listening on (\S+)", process.stdout.readline()).group(1)
        with PolicyAdminClient(address, token=TOKEN) as admin:
            assert "creative" in {p.name for p in admin.list_policies()}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.communicate()
    token_file.write_text("\n")
    empty = subprocess.run([sys.executable, "-m", "sampler_service", "serve", "--port", "0",
                            "--device", "cpu", "--admin-token-file", str(token_file)],
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "empty" in empty.stderr
