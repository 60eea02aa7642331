"""The Bitrix24 `batch` method: up to 50 commands in PHP query-string form, run in order.

`$result[name]` (and deeper paths such as `$result[name][0]`) in a later command's parameter
values is replaced by an earlier command's result after the query string is parsed, as Bitrix24
does. A reference to a command that failed or has not run fails the referring command too: a
deal must never be created with a contact id that does not exist.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from service.errors import BadInput
from service.intake.bodies import parse_nested_pairs
from service.simulators.bitrix24.entities import BitrixFault, bad_arg

__all__ = ["MAX_COMMANDS", "Answer", "Execute", "parse_command", "run_batch"]

MAX_COMMANDS = 50
_SECTIONS = ("result", "result_error", "result_total", "result_next", "result_time")
_REF = re.compile(r"\$(" + "|".join(_SECTIONS) + r")((?:\[[^\[\]]*\])+)")
_PATH = re.compile(r"\[([^\[\]]*)\]")


@dataclass
class Answer:
    """A method's successful answer: `result`, its `time`, and paging for list methods."""

    result: Any
    time: dict[str, Any]
    total: int | None = None
    next: int | None = None


# Runs one method with its parameters; raises BitrixFault for an error answer.
Execute = Callable[[str, dict[str, Any]], Awaitable[Answer]]


def parse_command(command: str) -> tuple[str, dict[str, Any]]:
    """`crm.deal.add?fields[TITLE]=x` → ("crm.deal.add", {"fields": {"TITLE": "x"}})."""
    method, _, query = command.partition("?")
    method = method.strip().lstrip("/").removesuffix(".json")
    try:
        params = parse_nested_pairs(parse_qsl(query, keep_blank_values=True))
    except BadInput as exc:
        raise bad_arg(f"command parameters: {exc}") from None
    return method, params


async def run_batch(body: Any, execute: Execute) -> dict[str, Any]:
    """Run every command of a `batch` body; the answer's `result` object, all sections keyed."""
    commands = _commands(body)
    halt = str(body.get("halt", 0)).strip().lower() in ("1", "true", "y")
    out: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    for name, command in commands:
        try:
            method, params = parse_command(command)
            if method == "batch":
                raise BitrixFault("ERROR_BATCH_METHOD_NOT_ALLOWED", "batch inside batch")
            answer = await execute(method, _substitute(params, out))
        except BitrixFault as fault:
            out["result_error"][name] = {
                "error": fault.code,
                "error_description": fault.description,
            }
            if fault.time is not None:
                out["result_time"][name] = fault.time
            if halt:
                break
            continue
        out["result"][name] = answer.result
        out["result_time"][name] = answer.time
        if answer.total is not None:
            out["result_total"][name] = answer.total
        if answer.next is not None:
            out["result_next"][name] = answer.next
    return out


def _commands(body: Any) -> list[tuple[str, str]]:
    cmd = body.get("cmd") if isinstance(body, dict) else None
    if isinstance(cmd, list):
        cmd = {str(n): c for n, c in enumerate(cmd)}
    if not isinstance(cmd, dict) or not all(isinstance(c, str) for c in cmd.values()):
        raise bad_arg("cmd must be an object of query strings")
    if len(cmd) > MAX_COMMANDS:
        raise BitrixFault("ERROR_BATCH_LENGTH_EXCEEDED", f"Max batch length is {MAX_COMMANDS}")
    return [(str(name), command) for name, command in cmd.items()]


def _substitute(value: Any, out: dict[str, dict[str, Any]]) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, out) for v in value]
    if isinstance(value, str) and "$" in value:
        whole = _REF.fullmatch(value)
        if whole is not None:  # the value is one reference: keep the referenced type
            return _resolve(whole, out)
        return _REF.sub(lambda m: str(_resolve(m, out)), value)
    return value


def _resolve(match: re.Match[str], out: dict[str, dict[str, Any]]) -> Any:
    section, path = match.group(1), _PATH.findall(match.group(2))
    current: Any = out[section]
    for key in path:
        if isinstance(current, list) and key.isdigit() and int(key) < len(current):
            current = current[int(key)]
        elif isinstance(current, dict) and key in current:
            current = current[key]
        else:
            raise bad_arg(f"{match.group(0)[:60]}: no such value (did that command fail?)")
    return current
