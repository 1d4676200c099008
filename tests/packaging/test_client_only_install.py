"""A client-only install (`pip install .`, no extras) as a user gets it: a fresh venv, the
project installed from a copy of its packaging files (pip builds the wheel), then the SDK
driving a server this test runs, and the console script without the `server` extra.

pip downloads grpcio, protobuf and numpy (and setuptools for the build) from the package
index: ~6-10 s with pip's cache warm, more on a cold one. Without an index this fails, naming
the cause; SAMPLER_OFFLINE=1 skips it instead.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: What `pip install .` needs: the metadata, the README it names, and the packages it finds.
SOURCES = ("pyproject.toml", "README.md", "sampler_service", "clients/python")
SERVER_EXTRA = "pip install 'sampler-sidecar[server]'"
ADMIN_TOKEN = "client-only-admin-token"
PIP_TIMEOUT_S = 300


@dataclass(frozen=True)
class ClientVenv:
    root: Path
    python: Path
    cli: Path
    env: dict
    install_s: float

    def run(self, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess:
        """A command in the venv, from a directory outside the repository (so that neither
        the working directory nor PYTHONPATH lends it the repository's packages)."""
        return subprocess.run([str(arg) for arg in args], capture_output=True, text=True,
                              timeout=timeout, env=self.env, cwd=self.root)

    def python_code(self, code: str, *args: str) -> subprocess.CompletedProcess:
        return self.run(self.python, "-c", textwrap.dedent(code), *args)


def _copy_sources(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in SOURCES:
        source, target = REPO / name, dest / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def _setuptools_builds(python: Path, env: dict) -> bool:
    """Whether the venv's own setuptools meets pyproject's build requirement (then pip may
    build without an isolated build environment, downloading nothing for it)."""
    text = (REPO / "pyproject.toml").read_text()
    needed = re.search(r'requires\s*=\s*\[\s*"setuptools>=(\d+)', text)
    found = subprocess.run([str(python), "-c", "import setuptools; print(setuptools.__version__)"],
                           capture_output=True, text=True, env=env, timeout=60)
    if needed is None or found.returncode != 0:
        return False
    return int(found.stdout.split(".")[0]) >= int(needed.group(1))


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> ClientVenv:
    """A venv with the project installed without extras; built once for this module."""
    if os.environ.get("SAMPLER_OFFLINE") == "1":
        pytest.skip("SAMPLER_OFFLINE=1: the client-only install needs the package index")
    root = tmp_path_factory.mktemp("client-only")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    venv = root / "venv"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=env,
                   cwd=root)
    python = venv / "bin" / "python"
    source = _copy_sources(root / "src")
    isolation = ["--no-build-isolation"] if _setuptools_builds(python, env) else []
    try:
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", *isolation, str(source)],
                             capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=env,
                             cwd=root)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`pip install .` took over {PIP_TIMEOUT_S} s: is the package index "
                    "reachable? (SAMPLER_OFFLINE=1 skips this test)")
    if pip.returncode != 0:
        tail = "\n".join((pip.stdout + pip.stderr).strip().splitlines()[-15:])
        pytest.fail(f"`pip install .` (no extras) into a fresh venv failed (exit "
                    f"{pip.returncode}); it downloads grpcio, protobuf and numpy from the "
                    f"package index, so check that it is reachable (SAMPLER_OFFLINE=1 skips "
                    f"this test):\n{tail}")
    install_s = time.perf_counter() - started
    print(f"\nclient-only venv + pip install: {install_s:.1f} s", file=sys.stderr)
    return ClientVenv(root=root, python=python, cli=venv / "bin" / "sampler-service", env=env,
                      install_s=install_s)


def test_the_sdk_imports_no_torch_yaml_or_server(client_venv):
    result = client_venv.python_code("""
        import importlib.util, json, sys
        import sampler_client
        print(json.dumps({
            "imported": [m for m in ("torch", "yaml", "sampler_service") if m in sys.modules],
            "installed": [m for m in ("torch", "yaml", "grpc_health", "numba")
                          if importlib.util.find_spec(m) is not None],
            "sdk": sampler_client.__file__}))
    """)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["imported"] == []
    assert found["installed"] == [], "a client-only install pulled in the server's dependencies"
    assert Path(found["sdk"]).is_relative_to(client_venv.root / "venv"), found["sdk"]


DRIVE = """
    import json, sys
    import numpy as np
    from sampler_client import SamplerClient

    answers = {}
    for transport in ("inline", "auto"):   # auto: shared memory to a loopback service
        with SamplerClient(sys.argv[1], transport=transport) as client:
            seq = client.create_sequence(policy="greedy", prompt_ids=[1, 2, 3])
            tokens = []
            for hot in (5, 9, 2):
                logits = np.zeros(64, dtype=np.float32)
                logits[hot] = 4.0
                tokens.append(seq.step(logits).token_id)
            sampled = client.create_sequence(policy="creative", prompt_ids=[1], seed=7)
            rows = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float16)
            choice = sampled.step(rows[0])
            seq.release()
            answers[transport] = {"greedy": tokens, "sampled": choice.token_id,
                                  "logprob": choice.logprob}
    print(json.dumps({**answers,
                      "server_imported": "sampler_service" in sys.modules or "torch" in sys.modules}))
"""


def test_the_sdk_drives_a_running_server(client_venv, start_server):
    server = start_server(admin_token=ADMIN_TOKEN)
    result = client_venv.python_code(DRIVE, server.address)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert answers["server_imported"] is False
    for transport in ("inline", "auto"):
        assert answers[transport]["greedy"] == [5, 9, 2], transport
        assert 0 <= answers[transport]["sampled"] < 64 and answers[transport]["logprob"] <= 0
    # Seeded sampling gives the same token whatever the transport.
    assert answers["inline"]["sampled"] == answers["auto"]["sampled"]

    # The CLI's client commands run without the server extra: health falls back to the
    # SDK's own grpc.health.v1 messages (grpcio-health-checking is in the extra).
    health = client_venv.run(client_venv.cli, "health", "--target", server.address)
    assert (health.returncode, health.stdout) == (0, "SERVING\n"), health.stderr
    listed = client_venv.run(client_venv.cli, "policies", "list", "--target", server.address,
                             "--token", ADMIN_TOKEN)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^greedy\s", listed.stdout, re.M), listed.stdout


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["health", "--help"],
                                  ["policies", "validate", "--help"]])
def test_help_exits_0_and_names_the_server_extra(client_venv, args):
    result = client_venv.run(client_venv.cli, *args)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps the note
    assert SERVER_EXTRA in text, result.stdout
    assert "no modules named 'torch'" in text and "(pyyaml)" in text, result.stdout


@pytest.mark.parametrize("command", [["serve"], ["serve", "--log-format", "json"],
                                     ["policies", "validate", "policies.yaml"]])
def test_server_commands_exit_2_naming_the_extra(client_venv, command):
    result = client_venv.run(client_venv.cli, *command)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert SERVER_EXTRA in result.stderr and "no module" in result.stderr, result.stderr
    assert "'torch'" in result.stderr, result.stderr
    if "json" in command:  # the one line stays JSON
        [line] = result.stderr.splitlines()
        assert json.loads(line)["event"] == "start_failed"


def test_python_m_serve_exits_2_too(client_venv):
    result = client_venv.run(client_venv.python, "-m", "sampler_service", "serve")
    assert result.returncode == 2 and SERVER_EXTRA in result.stderr, result.stderr
