"""docs/configuration.md's variable tables against the settings code, so the two cannot drift.

The code side is read from the source, not from a `Settings` object: every call such as
`r.number("WORKER_CONCURRENCY", int, 100, 1, 10000)` or `r.text("HOST") or "0.0.0.0"` in the
settings module(s) names a variable and its default. The docs side is every table under
"## Environment variables": the first column names one or more variables, the second their
defaults, one per variable in the same order ("2, 900, 12"), or one for all of them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"
# the settings reader's methods
READS = {"text", "secret", "fernet_keys", "number", "url", "choice", "flag", "region", "networks"}
NO_DEFAULT = "–"
# Defaults the code computes rather than states; the docs describe them in words.
DESCRIBED = {
    "DATABASE_URL": "embedded",  # unset: the embedded PostgreSQL
    "DATABASE_DIRECT_URL": "DATABASE_URL",  # unset: DATABASE_URL serves both
    "CRM": "guessed",  # unset: from which credentials are set
    "AMOCRM_PIPELINE_ID": "account default",  # 0 or unset: the CRM account's own
    "AMOCRM_STATUS_ID": "account default",
    "BITRIX24_CATEGORY_ID": "portal default",  # unset: category 0, its first stage
    "BITRIX24_STAGE_ID": "portal default",
}


def settings_sources() -> list[Path]:
    """service/settings.py, or every module of a service/settings/ package."""
    package = ROOT / "service" / "settings"
    return sorted(package.glob("*.py")) if package.is_dir() else [ROOT / "service/settings.py"]


def _constants(tree: ast.Module) -> dict[str, Any]:
    """Module-level NAME = <literal> assignments, for defaults written as a constant's name."""
    found: dict[str, Any] = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name):
            try:
                found[target.id] = ast.literal_eval(node.value)  # type: ignore[union-attr]
            except ValueError:
                pass
    return found


def _value(node: ast.expr, names: dict[str, Any]) -> Any:
    """A literal, a constant's name, arithmetic on those, or `DICT[...]` (the whole dict)."""
    if isinstance(node, ast.Name):
        return names[node.id]
    if isinstance(node, ast.Subscript):
        return _value(node.value, names)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult | ast.Pow):
        left, right = _value(node.left, names), _value(node.right, names)
        return left * right if isinstance(node.op, ast.Mult) else left**right
    return ast.literal_eval(node)


def _argument(call: ast.Call, position: int, keyword: str) -> ast.expr:
    if len(call.args) > position:
        return call.args[position]
    return next(k.value for k in call.keywords if k.arg == keyword)


def _locals(tree: ast.Module, shared: dict[str, Any]) -> dict[str, Any]:
    """Constants (the package's, `shared`, then this module's), then locals such as
    `rate_default = DEFAULT_RATES[crm]` (by name: one file)."""
    names = {**shared, **_constants(tree)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                names.setdefault(node.targets[0].id, _value(node.value, names))
            except (KeyError, ValueError, TypeError):
                pass
    return names


def _fallbacks(tree: ast.Module) -> dict[int, ast.expr]:
    """id(read) -> what follows `or`: `r.text("HOST") or "0.0.0.0"`, or
    `mode = r.choice(...)` ... `mode or "index"`."""
    bound = {
        node.targets[0].id: id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            for value in node.values[:-1]:
                key = bound.get(value.id, 0) if isinstance(value, ast.Name) else id(value)
                found[key] = node.values[-1]
    return found


def _reads(tree: ast.Module) -> list[ast.Call]:
    """Calls such as `r.number("PORT", ...)`: a reader method on an upper-case name."""
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in READS
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and re.fullmatch(r"[A-Z][A-Z0-9_]+", str(node.args[0].value))
    ]


def code_defaults() -> dict[str, Any]:
    """Every variable the settings read, with its default (None: no default)."""
    found: dict[str, Any] = {}
    trees = [ast.parse(path.read_text()) for path in settings_sources()]
    shared = {k: v for tree in trees for k, v in _constants(tree).items()}  # imported constants
    for tree in trees:
        names, fallbacks = _locals(tree, shared), _fallbacks(tree)
        for call in _reads(tree):
            method = call.func.attr  # type: ignore[attr-defined]
            default: Any = None
            if method in ("number", "choice"):  # (name, kind | options, default, ...)
                default = _value(_argument(call, 2, "default"), names)
            elif method == "flag":
                default = False
            if id(call) in fallbacks and default in (None, 0):
                try:
                    default = _value(fallbacks[id(call)], names)
                except ValueError:  # computed, e.g. `or _guess_crm(env)`: DESCRIBED says it
                    pass
            found[call.args[0].value] = default  # type: ignore[attr-defined]
    return found


def doc_defaults() -> dict[str, str]:
    """Variable -> its default cell (backticks stripped), from the environment tables."""
    text = DOC.read_text()
    section = text.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    found: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        variables = re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0])
        defaults = [d.strip().strip("`") for d in cells[1].split(",")]
        if len(defaults) != len(variables):
            defaults = [cells[1].strip("`")] * len(variables)
        for variable, default in zip(variables, defaults, strict=True):
            assert variable not in found, f"{variable} is in docs/configuration.md twice"
            found[variable] = default
    return found


def agrees(variable: str, code: Any, doc: str) -> bool:
    """Whether the docs' default cell says what the code does."""
    if variable in DESCRIBED:
        return doc == DESCRIBED[variable]
    if code is None:
        return doc == NO_DEFAULT
    if isinstance(code, bool):
        return doc == str(code).lower()
    if isinstance(code, dict):  # per-CRM defaults, written "amoCRM 6, Bitrix24 2"
        said = {k.lower(): float(v) for k, v in re.findall(r"(\w+) ([\d.]+)", doc)}
        return bool(said) and all(code[k] == v for k, v in said.items())
    if isinstance(code, int | float):
        try:
            return float(doc) == float(code)
        except ValueError:
            return False
    return doc == str(code)


def test_the_settings_code_is_read() -> None:
    """A refactor the reader here no longer understands fails, rather than checking nothing."""
    code = code_defaults()
    assert len(code) > 50, sorted(code)
    assert code["WORKER_CONCURRENCY"] == 100 and code["HOST"] == "0.0.0.0"
    assert code["MAX_BODY_BYTES"] == 65536 and code["ADMIN_TOKEN"] is None


def test_every_variable_the_code_reads_is_documented_and_nothing_else() -> None:
    code, doc = code_defaults(), doc_defaults()
    assert sorted(code.keys() - doc.keys()) == [], "read by the code, missing in the docs"
    assert sorted(doc.keys() - code.keys()) == [], "in the docs, read by no code"


def test_every_documented_default_is_the_code_default() -> None:
    code, doc = code_defaults(), doc_defaults()
    wrong = {
        name: {"docs": doc[name], "code": code[name]}
        for name in sorted(code.keys() & doc.keys())
        if not agrees(name, code[name], doc[name])
    }
    assert wrong == {}, "docs/configuration.md disagrees with the settings code"
