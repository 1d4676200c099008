"""The service's log output: `--log-format text` (the default, for people) or `json` (one
object per line, for a log pipeline), and `--log-level`.

A JSON line carries `ts` (RFC 3339, UTC, milliseconds), `level`, `logger` and `msg`, then every
field the call gave through `extra=` as it is (`extra={"event": "start", "port": 50051}` adds
`"event": "start", "port": 50051`): the formatter knows no field names, so any module can add
structured fields without touching it. A field that is not JSON (a Path, an enum) is written
as its `str()`; one named like a fixed key is written as `extra.NAME`. A traceback comes as
`exc` (one string), a `stack_info` stack as `stack`.

Lifecycle lines carry an `event` field: `start` (the addresses bound), `reload` (a policy
file reload, `result` ok or error with its `reason`), `drain` (SIGTERM or SIGINT received,
`grace_s`), `stop`. Nothing is logged per step or per token at INFO.
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

#: The values of `--log-format`.
FORMATS = ("text", "json")
#: The values of `--log-level` (upper case; the flag takes either case).
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: The text format (as before `--log-format` existed).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every LogRecord has (and those logging adds while formatting): anything else
#: in a record's __dict__ came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
#: Keys of every JSON line; an extra field with one of these names is renamed `extra.NAME`.
_FIXED = ("ts", "level", "logger", "msg", "exc", "stack")


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a logging call gave through `extra=`, in the order given."""
    return {key: value for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_")}


def rfc3339(timestamp: float) -> str:
    """`timestamp` (seconds since the epoch) as RFC 3339 in UTC with milliseconds:
    2026-01-02T03:04:05.678Z."""
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": rfc3339(record.created), "level": record.levelname,
                                "logger": record.name, "msg": record.getMessage()}
        for key, value in extra_fields(record).items():
            line[f"extra.{key}" if key in _FIXED else key] = value
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Sends the process's logs to `stream` (default: stderr) at `level`, as text or JSON.
    Replaces handlers configured before; in JSON mode Python's warnings are logged too (as
    `py.warnings` lines) so that every line of the stream is JSON."""
    if fmt not in FORMATS:
        raise ValueError(f"--log-format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if level.upper() not in LEVELS:
        raise ValueError(f"--log-level {level!r}: expected one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(fmt == "json")
