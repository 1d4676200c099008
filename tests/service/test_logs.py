"""The service's logs: `serve --log-format json` as a user runs it (a subprocess) writes one JSON
object per line, with one line per lifecycle event (start with every address bound, reload ok
or failed, drain on SIGTERM, stop) and none per step; the text format prints the addresses
too; the JSON formatter renders any `extra=` field without knowing its name."""
from __future__ import annotations

import io
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ADDRESS = re.compile(r"^(?:\d{1,3}\.){3}\d{1,3}:(\d+)$")

POLICY = textwrap.dedent("""
    policies:
      precise:
        chain:
          - temperature: {temperature: %s}
          - top_k: {k: 2}
        select: sample
        overridable: [seed]
""")


def replace_file(path: Path, text: str) -> None:
    """Writes `path` atomically: the watcher (polling every 0.1 s) never reads half a file."""
    staged = path.with_suffix(".staged")
    staged.write_text(text)
    os.replace(staged, path)


class JsonServer:
    """`sampler-service serve --log-format json`; its stderr read line by line, each line
    parsed (a line that is not JSON fails the test where it is read)."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sampler_service", "serve", "--port", "0", "--device", "cpu",
             "--log-format", "json", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict] = []
        self._next = 0  # lines before it were looked at by wait_for
        self._raw: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stderr:
            self._raw.put(line)
        self._raw.put(None)

    def wait_for(self, event: str, timeout: float = 60.0, **fields) -> dict:
        """The next line (after the one last returned) with this event and these fields."""
        deadline = time.monotonic() + timeout
        while True:
            while self._next < len(self.lines):
                line = self.lines[self._next]
                self._next += 1
                if line.get("event") == event and all(line.get(k) == v for k, v in fields.items()):
                    return line
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {event} line {fields} in {self.lines}"
            try:
                raw = self._raw.get(timeout=remaining)
            except queue.Empty:
                continue
            assert raw is not None, f"the service exited before a {event} line: {self.lines}"
            self.lines.append(json.loads(raw))  # every line is JSON

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        return code, self.process.stdout.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()
        self.process.stderr.close()


@pytest.fixture
def json_server():
    started: list[JsonServer] = []

    def start(*args: str) -> JsonServer:
        started.append(JsonServer(*args))
        return started[-1]

    yield start
    for server in started:
        server.close()


def test_json_lifecycle_lines(json_server, tmp_path):
    import torch

    from sampler_client import SamplerClient
    policies = tmp_path / "policies.yaml"
    policies.write_text(POLICY % 0.1)
    uds = tmp_path / "sampler.sock"
    server = json_server("--uds", str(uds), "--health-port", "0", "--health-host", "127.0.0.1",
                         "--metrics-port", "0", "--policies", str(policies),
                         "--policy-reload-interval", "0.1", "--grace", "3")

    start = server.wait_for("start")
    assert ADDRESS.match(start["data"]) and start["uds"] == str(uds)
    assert int(ADDRESS.match(start["health"]).group(1)) > 0
    metrics = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/metrics", start["metrics"])
    assert metrics and int(metrics.group(1)) > 0  # the port bound for --metrics-port 0
    with urllib.request.urlopen(start["metrics"], timeout=10) as response:
        assert b"sampler_policy_reloads" in response.read()
    assert (start["device"], start["shared_memory"], start["tls"]) == ("cpu", True, "off")
    for key in ("data", "health", "metrics"):
        assert start[key] in start["msg"]

    # Steps log nothing at INFO (the client's shared-memory region is logged as it registers
    # and unregisters, once per client): what follows them is the reload.
    seen = len(server.lines)
    with SamplerClient(start["data"]) as client:
        sequence = client.create_sequence(policy="precise", seed=1)
        for _ in range(20):
            sequence.step(torch.tensor([0.0, 5.0, 4.9, -1.0]))
    replace_file(policies, POLICY % 0.2)
    reload = server.wait_for("reload")
    between = [line for line in server.lines[seen:-1]
               if line["logger"] != "sampler_service.server.shared_memory"]
    assert between == [] and len(server.lines[seen:-1]) <= 2, server.lines[seen:]
    assert (reload["result"], reload["changed"], reload["level"]) == ("ok", ["precise"], "INFO")
    assert reload["path"] == str(policies)

    replace_file(policies, POLICY % "-1")  # a negative temperature: rejected
    failed = server.wait_for("reload", result="error")
    assert failed["level"] == "ERROR" and "temperature" in failed["reason"]
    assert failed["reason"] in failed["msg"]

    code, stdout = server.stop()
    drain = server.wait_for("drain")
    assert (drain["signal"], drain["grace_s"]) == ("SIGTERM", 3.0)
    stop = server.wait_for("stop")
    assert code == 0
    assert stdout == ""  # JSON mode: every line is a JSON log line, on stderr
    for line in server.lines:
        assert RFC3339_UTC.match(line["ts"]), line
        assert {"level", "logger", "msg"} <= set(line)
    events = [line["event"] for line in server.lines if "event" in line]
    assert events == ["start", "reload", "reload", "drain", "stop"]
    assert server.lines[-1] is stop


def test_text_format_prints_every_address(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "sampler_service", "serve", "--port", "0",
                                "--device", "cpu", "--health-port", "0", "--health-host",
                                "127.0.0.1", "--metrics-port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        found = re.fullmatch(r"sampler-service listening on 127\.0\.0\.1:(\d+) \(device cpu\); "
                             r"health 127\.0\.0\.1:(\d+); "
                             r"metrics http://127\.0\.0\.1:(\d+)/metrics\n", line)
        assert found and all(int(port) > 0 for port in found.groups()), line
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        log = process.stderr.read()
        assert re.search(r" INFO sampler_service\.server\.app: started: data port ", log)
        assert "SIGTERM received: draining for up to 10.0s" in log and "stopped" in log
    finally:
        process.kill()
        process.communicate()


def test_bad_log_flags_are_usage_errors():
    for flags in (["--log-format", "yaml"], ["--log-level", "LOUD"]):
        result = subprocess.run([sys.executable, "-m", "sampler_service", "serve", *flags],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and flags[0] in result.stderr


def test_a_start_failure_is_a_json_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sampler_service", "serve", "--port", "0",
                             "--device", "cpu", "--log-format", "json",
                             "--policies", str(tmp_path / "missing.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines[-1]["event"] == "start_failed" and lines[-1]["level"] == "ERROR"
    assert "missing.yaml" in lines[-1]["reason"]


# -- the formatter, in process ----------------------------------------------------------------
def _record(logger: logging.Logger, stream: io.StringIO, *args, **kwargs) -> dict:
    logger.info(*args, **kwargs)
    return json.loads(stream.getvalue().splitlines()[-1])


@pytest.fixture
def json_logger():
    from sampler_service.logs import JsonFormatter
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def test_json_renders_any_extra_field(json_logger):
    logger, stream = json_logger
    line = _record(logger, stream, "Step failed: %s", "INVALID_ARGUMENT",
                   extra={"event": "request_failed", "method": "/sampler.v1.Sampler/Step",
                          "code": "INVALID_ARGUMENT", "field": "requests[0].logits",
                          "sequence_id": "s-1", "path": Path("/x"), "ids": (1, 2)})
    assert RFC3339_UTC.match(line.pop("ts"))
    assert line == {"level": "INFO", "logger": "tests.logs", "msg": "Step failed: INVALID_ARGUMENT",
                    "event": "request_failed", "method": "/sampler.v1.Sampler/Step",
                    "code": "INVALID_ARGUMENT", "field": "requests[0].logits",
                    "sequence_id": "s-1", "path": "/x", "ids": [1, 2]}


def test_json_keeps_its_fixed_keys_and_one_line(json_logger):
    logger, stream = json_logger
    line = _record(logger, stream, "two\nlines", extra={"level": "mine", "ts": 1})
    assert line["level"] == "INFO" and line["extra.level"] == "mine" and line["extra.ts"] == 1
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    output = stream.getvalue().splitlines()
    assert len(output) == 2  # a message's newline and a traceback stay inside their line
    failed = json.loads(output[-1])
    assert failed["level"] == "ERROR" and "ValueError: boom" in failed["exc"]


def test_log_levels_and_formats_agree_with_the_cli():
    from sampler_service import cli, logs
    assert (cli.LOG_LEVELS, cli.LOG_FORMATS) == (logs.LEVELS, logs.FORMATS)
