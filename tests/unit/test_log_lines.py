"""The log handler `logs.setup` installs: lines batched per event-loop turn, and the access log's
direct path (`logs.log_direct`) writing exactly what the ordinary logging path writes."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from service import logs

ACCESS = logging.getLogger(logs.ACCESS_LOGGER)
EXTRAS = {
    "action": "http_request",
    "method": "POST",
    "route": "/api/v1/forms/{form}",
    "path": "/api/v1/forms/bench",
    "status": 200,
    "ms": 12.5,
    "submission_id": "0b7f1f5e-0d1c-4c44-9d73-5d3a2b1c0e9f",
}


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()
    yield buf
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("created", [1_795_000_000.0, 1_795_000_000.9996, 1_795_000_059.0421])
def test_direct_line_is_what_the_formatter_makes_of_the_record(
    stream: io.StringIO, fmt: str, created: float
) -> None:
    logs.setup("INFO", fmt, stream)
    [handler] = logging.getLogger().handlers
    msg = "POST /api/v1/forms/bench 200"
    record = ACCESS.makeRecord(ACCESS.name, logging.INFO, "", 0, msg, (), None, extra=EXTRAS)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes it
    token = logs.REQUEST_ID.set("rid-7")
    try:
        for f in handler.filters:
            assert callable(getattr(f, "filter", None)) and f.filter(record)  # type: ignore[union-attr]
        expected = handler.format(record)
    finally:
        logs.REQUEST_ID.reset(token)
    formatter = handler.formatter
    assert isinstance(formatter, logs.JsonFormatter | logs.TextFormatter)
    got = formatter.line(created, logging.INFO, ACCESS.name, msg, {**EXTRAS, "request_id": "rid-7"})
    assert got == expected


def test_direct_path_writes_through_setup_handler_only(stream: io.StringIO) -> None:
    logs.setup("INFO", "json", stream)
    token = logs.REQUEST_ID.set("rid-8")
    try:
        logs.log_direct(ACCESS, logging.INFO, "POST /x 200", dict(EXTRAS))
    finally:
        logs.REQUEST_ID.reset(token)
    line = stream.getvalue()  # no running loop: written at once
    assert '"request_id":"rid-8"' in line and '"status":200' in line and line.endswith("}\n")


def test_direct_path_gives_way_to_any_other_handler(stream: io.StringIO) -> None:
    """A second handler (pytest's caplog, an operator's) gets the record the ordinary way."""
    logs.setup("INFO", "text", stream)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logging.getLogger().addHandler(Keep())
    logs.log_direct(ACCESS, logging.INFO, "POST /x 200", dict(EXTRAS))
    [record] = seen
    assert record.getMessage() == "POST /x 200" and record.__dict__["status"] == 200
    assert "POST /x 200" in stream.getvalue() and "status=200" in stream.getvalue()


async def test_lines_of_one_loop_turn_go_out_together_warnings_at_once(
    stream: io.StringIO,
) -> None:
    logs.setup("INFO", "text", stream)
    log = logging.getLogger("service.test_lines")
    writes: list[str] = []
    real_write = stream.write

    def write(text: str) -> int:
        writes.append(text)
        return real_write(text)

    stream.write = write  # type: ignore[method-assign]
    log.info("one")
    log.info("two")
    assert writes == []  # still this turn
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(writes) == 1 and writes[0].count("\n") == 2
    log.info("three")
    log.warning("four")  # at once, after what was pending, in order
    assert len(writes) == 2 and writes[1].index("three") < writes[1].index("four")
    await asyncio.sleep(0)
    assert len(writes) == 2  # nothing left for the end of the turn
    lines = stream.getvalue().splitlines()
    assert [ln.rsplit(": ", 1)[1] for ln in lines] == ["one", "two", "three", "four"]


def test_a_loop_closed_before_its_turn_ended_does_not_hold_back_the_next(
    stream: io.StringIO,
) -> None:
    logs.setup("INFO", "text", stream)
    log = logging.getLogger("service.test_lines")

    async def log_and_leave() -> None:
        log.info("from the first loop")

    first = asyncio.new_event_loop()
    first.run_until_complete(log_and_leave())  # the turn-end flush may still be queued
    first.close()

    async def log_again() -> None:
        log.info("from the second loop")
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(log_again())
    text = stream.getvalue()
    assert "from the first loop" in text and "from the second loop" in text


def test_a_trouble_is_said_once_reminded_rarely_and_said_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    trouble = logs.Trouble(
        logging.getLogger("t.trouble"), "heartbeat", "beat_down", remind_s=60, clock=lambda: now[0]
    )
    with caplog.at_level(logging.INFO, logger="t.trouble"):
        for _ in range(30):  # a try every 2 s for a minute: one line
            trouble.failed("prepared statement gone")
            now[0] += 2
        assert trouble.reason() == "heartbeat failing for 60 s: prepared statement gone"
        trouble.failed("prepared statement gone")  # a minute on: reminded once
        trouble.ok()
        trouble.ok()
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [
        ("ERROR", "heartbeat failing: prepared statement gone"),
        ("ERROR", "heartbeat still failing after 60 s: prepared statement gone"),
        ("WARNING", "heartbeat working again after 60 s"),
    ]
    assert trouble.reason() is None and not trouble.failing


def test_json_lines_carry_an_rfc3339_utc_millisecond_timestamp(stream: io.StringIO) -> None:
    """`timestamp` (UTC, milliseconds, `Z`), `level`, `logger`, `message`, then the fields; an
    exception under `exception`; phones and emails still masked."""
    logs.setup("INFO", "json", stream)
    log = logging.getLogger("service.scenario")
    before = datetime.now(UTC)
    log.info("lead from +7 701 234 56 78", extra={"action": "t_json", "job_id": 7})
    try:
        raise ValueError("no answer for ivan@example.com")
    except ValueError:
        log.exception("failed", extra={"action": "t_exc"})
    first, second = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert list(first)[:4] == ["timestamp", "level", "logger", "message"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["timestamp"])
    stamp = datetime.fromisoformat(first["timestamp"])  # 3.11 reads the `Z`
    assert stamp.utcoffset() == timedelta(0)
    assert abs(stamp - before) < timedelta(seconds=5)
    assert first["level"] == "INFO" and first["logger"] == "service.scenario"
    assert first["message"] == "lead from +7******5678"
    assert first["action"] == "t_json" and first["job_id"] == 7
    assert "ValueError" in second["exception"] and "i***@example.com" in second["exception"]


def test_json_timestamp_of_a_given_instant() -> None:
    formatter = logs.JsonFormatter()
    assert formatter._utc(1_795_000_059.0421) == "2026-11-18T11:07:39.042Z"
    assert formatter._utc(1_795_000_000.9996) == "2026-11-18T11:06:40.999Z"
