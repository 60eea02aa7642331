"""The Bitrix24 `batch` method: up to 50 commands in PHP query-string form, run in order.

References to earlier commands are substituted the way the real server does it, leniency and
all (CRM_FACTS.md, "Where a lenient simulator hides a production failure": Bitrix24 batch
references; Bitrix24's server code `CRestProvider::methodsBatch` and
`CRestUtil::processBatchElement`/`processBatchStructure`):

- after the query string is parsed, every parameter value is searched, case-insensitively, for
  `$result`, `$next`, `$total`, `$time` or `$error` followed by a path of `[key]`s (everything
  up to the next whitespace is the match);
- the section is looked up by the name as written (`$RESULT[...]` names no section: null), then
  the path is walked key by key and the walk simply **stops** at the first key that is not
  there — a reference to a command that failed or did not run yields the whole section
  (every earlier command's result), not an error;
- a value that is nothing but the reference becomes what was found, of any type (an id, a
  list, the whole section, null); inside longer text a number or string is spliced in and
  anything else leaves the text as it was.

So the command that uses a failed command's result runs anyway: `crm.deal.add` with
`CONTACT_IDS[0]=$result[c1]` after `c1` failed makes a deal whose contact is the section read
as an id (see `BitrixStore._contact_ids`) — bound to no contact or the wrong one.
"""

from __future__ import annotations

import copy
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
# methodsBatch keeps its running results under these names; the answer renames them (_SECTIONS)
_NAMES = {
    "result": "result",
    "next": "result_next",
    "total": "result_total",
    "time": "result_time",
    "error": "result_error",
}
# processBatchElement: "/\$(result|next|total|time|error)([^\s]*)/i"
_REF = re.compile(r"\$(" + "|".join(_NAMES) + r")(\S*)", re.IGNORECASE)
_PATH = re.compile(r"\[([^\]]+)\]")


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
    """processBatchStructure: every value of the parsed parameters, nested ones included."""
    if isinstance(value, dict):
        return {k: _substitute(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, out) for v in value]
    if isinstance(value, str) and "$" in value:
        return _substitute_text(value, out)
    return value


def _substitute_text(text: str, out: dict[str, dict[str, Any]]) -> Any:
    """processBatchElement for one value: what it becomes (not always a string)."""
    current: Any = text
    for match in list(_REF.finditer(text)):
        keys = _PATH.findall(match.group(2))
        if not keys:
            continue  # "$result" without a [key] is left alone
        found = _walk(out, match.group(1), keys)
        if match.group(0) == current:
            return found  # the whole value: any type, the whole section included
        if isinstance(found, bool) or not isinstance(found, str | int | float):
            continue  # PHP: not a string (or a number) → the text is left as it was
        if isinstance(current, str):
            current = current.replace(match.group(0), str(found))
    return current


def _walk(out: dict[str, dict[str, Any]], name: str, keys: list[str]) -> Any:
    """`$arResult[name]`, then each key while it exists (isset); stops, silently, at the
    first that does not."""
    section = _NAMES.get(name)  # PHP array keys are case-sensitive: "RESULT" finds nothing
    current: Any = copy.deepcopy(out[section]) if section is not None else None
    for key in keys:
        if isinstance(current, dict) and current.get(key) is not None:
            current = current[key]
        elif isinstance(current, list) and key.isdigit() and int(key) < len(current):
            if current[int(key)] is None:
                break
            current = current[int(key)]
        else:
            break
    return current
