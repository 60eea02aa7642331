"""Logging: JSON lines for machines (`LOG_FORMAT=json`) or plain text for people."""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
from typing import Any, TextIO

import orjson

from service.normalize import mask_email, mask_phone

# the request being handled, set by the HTTP middleware; every record logged meanwhile carries it
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# A phone in E.164 or as people type it with a "+" (`+7 701 123-45-67`, URL-encoded too), or a
# Russian/Kazakh 11-digit number with its leading 7/8 and no "+" (`87011234567`, `8 (701) …`).
_PHONE = re.compile(
    r"(?:\+|%2[Bb])\d[\d\s().-]{6,20}\d"
    r"|(?<![\w.+-])[78][\s(-]{0,2}\d{3}[\s)-]{0,2}\d{3}[\s-]?\d{2}[\s-]?\d{2}(?![\w.-])"
)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")

# The per-request line (service.metrics) is built from masked parts: the mask filter, ~40 % of
# that line's cost, would find nothing in it.
ACCESS_LOGGER = "service.access"
PREMASKED = frozenset({ACCESS_LOGGER})

# attributes every LogRecord has; anything else came in through `extra=`
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class _SecondFormatter(logging.Formatter):
    """formatTime that renders the date and time once per second (strftime per record was a
    tenth of the per-request log line); the milliseconds are added per record as before."""

    _cached: tuple[tuple[int, str | None], str] = ((-1, None), "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        key = (int(record.created), datefmt)
        cached_key, text = self._cached
        if cached_key != key:
            text = time.strftime(datefmt or self.default_time_format, self.converter(key[0]))
            self._cached = (key, text)  # one assignment: safe if a thread logs meanwhile
        return text if datefmt else f"{text},{int(record.msecs):03d}"


class JsonFormatter(_SecondFormatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info or record.exc_text:
            # exc_text is the masked text MaskFilter left; format the exception only without it
            data["exc"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return orjson.dumps(data, default=str).decode()


class TextFormatter(_SecondFormatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


def _phone(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group().replace("%2B", "").replace("%2b", ""))
    if len(digits) == 11 and digits[0] == "8" and not match.group().startswith("+"):
        digits = "7" + digits[1:]  # the trunk prefix people write for +7
    return mask_phone("+" + digits)


def mask_text(text: str) -> str:
    """Every phone and email in `text` masked (`+7******2233`, `i***@example.com`)."""
    if "@" in text:
        text = _EMAIL.sub(lambda m: mask_email(m.group()), text)
    return _PHONE.sub(_phone, text)


def _mask_value(value: Any) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {k: _mask_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_value(v) for v in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    return mask_text(str(value))  # exceptions, UUIDs, paths: as the formatter would print them


class MaskFilter(logging.Filter):
    """Masks phones and emails in the message, its extras and exception text, in place, so every
    handler after it (and every format) sees only the masked record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in PREMASKED:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it; still mask what we can
            message = f"{record.msg} {record.args}"
        record.msg = mask_text(message)
        record.args = None
        for key, value in _extras(record).items():
            setattr(record, key, _mask_value(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_text(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_text(record.stack_info)
        return True


class ContextFilter(logging.Filter):
    """Adds the current request id to records that do not name one."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        if rid is not None and not hasattr(record, "request_id"):
            record.request_id = rid
        return True


def setup(level: str, fmt: str, stream: TextIO | None = None) -> None:
    # No format of ours prints where a call came from, nor thread or process names: skip
    # collecting them (the logging HOWTO's "Optimization" section); finding the caller alone
    # walks the stack on every record.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(MaskFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
