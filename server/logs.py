"""Structured log lines: one JSON object per line (or plain text), one per lifecycle event."""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
import time

LOGGER = "mnist_edge.server"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        text = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname.lower():<7} {record.getMessage()}"
        if fields:
            text += f"  [{fields}]"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(fmt: str = "json", level: str = "info", stream=None) -> logging.Logger:
    logger = logging.getLogger(LOGGER)
    logger.handlers.clear()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def event(name: str, msg: str, level: int = logging.INFO, exc_info=None, **fields) -> None:
    logging.getLogger(LOGGER).log(level, msg, extra={"event": name, "fields": fields}, exc_info=exc_info)


# What gRPC core (absl) and other native code write to fd 2: "I1202 02:46:20.482950   31908 file.cc:123] text".
_NATIVE_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]\s]+)\] ?(.*)$")
_NATIVE_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
_MAX_NATIVE_CHARS = 4096
_pump: threading.Thread | None = None
_original_stderr: int | None = None


def capture_native_stderr() -> None:
    """JSON logs stay JSON: lines that native code (gRPC core, onnxruntime) writes straight to
    fd 2, such as one per failed TLS handshake, become `native_log` events.

    fd 2 becomes a pipe read by one daemon thread; the log handlers keep writing to the
    original stderr. Lines that already are JSON objects (a worker's log) pass through as they
    are. What native code writes just before the process dies abruptly may be lost (it is in
    the pipe, not yet on stderr): docs/limits.md.
    """
    global _pump, _original_stderr
    if _pump is not None:
        return
    _original_stderr = os.dup(2)
    stream = os.fdopen(os.dup(_original_stderr), "w", buffering=1, encoding="utf-8", errors="replace")
    for handler in logging.getLogger(LOGGER).handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(stream)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    _pump = threading.Thread(target=_relay, args=(read_end, stream), name="native-stderr", daemon=True)
    _pump.start()
    atexit.register(flush_native_stderr)


def _relay(read_end: int, stream) -> None:
    with os.fdopen(read_end, "rb") as lines:
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")[:_MAX_NATIVE_CHARS]
            if not line.strip():
                continue
            if line.startswith("{") and line.endswith("}"):
                try:
                    json.loads(line)
                except ValueError:
                    pass
                else:
                    stream.write(line + "\n")  # a worker's JSON log line
                    continue
            match = _NATIVE_LINE.match(line)
            if match:
                text = match.group(3)
                name = "tls_handshake_failed" if text.startswith("Handshake failed") else "native_log"
                event(name, text, _NATIVE_LEVELS[match.group(1)], source=match.group(2))
            else:
                event("native_log", line, logging.INFO)


def flush_native_stderr(timeout: float = 1.0) -> None:
    """Give fd 2 back to the original stderr and let the relay write what it still holds."""
    global _pump
    if _pump is None or _original_stderr is None:
        return
    sys.stderr.flush()
    os.dup2(_original_stderr, 2)  # closes the pipe's write end here: the relay sees its end
    _pump.join(timeout)
    _pump = None
