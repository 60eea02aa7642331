"""scripts/mutation_score.py: a survivor counts as explained only while the function it mutates
is the one its explanation was written for (mutmut numbers a function's mutants in order, so a
changed function can give a listed name to another mutant)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
MODULE = "service.intake.keys"
KILLED, SURVIVED = 1, 0


def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "mutation_score", ROOT / "scripts/mutation_score.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def meta(get_hash: str) -> dict[str, object]:
    return {
        "exit_code_by_key": {
            f"{MODULE}.xǁIdempotencyWindowǁget__mutmut_1": KILLED,
            f"{MODULE}.xǁIdempotencyWindowǁget__mutmut_5": SURVIVED,
            f"{MODULE}.x_window_key__mutmut_2": SURVIVED,
        },
        "hash_by_function_name": {"xǁIdempotencyWindowǁget": get_hash, "x_window_key": "w1"},
    }


def marks(lines: list[str]) -> dict[str, str]:
    """Each survivor's mark (explained, STALE, UNEXPLAINED) by its function."""
    return {
        line.split()[2].split(".")[-1].split("__mutmut_")[0]: line.split()[1] for line in lines[1:]
    }


def test_the_explanations_are_the_backticked_names_before_the_dash() -> None:
    text = (
        "Some prose with `code` — and a dash.\n"
        "- `a.x_f__mutmut_1`, `a.x_g__mutmut_*` — why both are harmless.\n"
        "- not an explanation `a.x_h__mutmut_1`\n"
    )
    assert script().explained(text) == {"a.x_f__mutmut_1", "a.x_g__mutmut_*"}


def test_a_survivor_whose_function_changed_since_it_was_explained_is_stale() -> None:
    s = script()
    known = {f"{MODULE}.xǁIdempotencyWindowǁget__mutmut_5"}
    recorded = {"xǁIdempotencyWindowǁget": "g1"}
    lines, current, bad = s.score(MODULE, meta("g1"), known, recorded)
    assert lines[0].split()[1:4] == ["3", "1", "2"]
    assert marks(lines) == {"xǁIdempotencyWindowǁget": "explained", "x_window_key": "UNEXPLAINED"}
    assert bad == 1 and current == {"xǁIdempotencyWindowǁget": "g1"}
    # the function was edited: the name may now stand for another change
    lines, current, bad = s.score(MODULE, meta("g2"), known, recorded)
    assert marks(lines)["xǁIdempotencyWindowǁget"] == "STALE" and bad == 2
    # re-read and accepted (`--accept` passes no recorded hashes): explained, at the new hash
    lines, current, bad = s.score(MODULE, meta("g2"), known, None)
    assert marks(lines)["xǁIdempotencyWindowǁget"] == "explained"
    assert bad == 1 and current == {"xǁIdempotencyWindowǁget": "g2"}
