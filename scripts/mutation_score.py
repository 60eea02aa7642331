"""The mutation score per module from mutmut's results in mutants/, and every survivor by name
(scripts/mutate runs this after mutmut).

    .venv/bin/python scripts/mutation_score.py service.intake.keys [module ...]
    .venv/bin/python scripts/mutation_score.py --accept service.intake.keys [module ...]

Killed: a test failed, or the mutant hung until mutmut's timeout (a test noticed it never
ends). Survived: every test passed, or no test reached the mutated function. Exit status 1
when a survivor is not in docs/mutation.md (each one there is explained: an equivalent mutant
or a change no promise depends on), or when its explanation is stale.

Stale: mutmut numbers a function's mutants in order, so when the function changes, a name in
docs/mutation.md may come to name another mutant, and its explanation to describe a change that
is no longer made. scripts/mutation_hashes.json keeps the hash mutmut gave each function whose
survivors are explained, as it was when they were last read; a function whose hash differs
marks its explained survivors STALE. Re-read each (`mutmut show NAME`), correct
docs/mutation.md, then `--accept` records the functions' current hashes.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path

from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parent.parent
KILLED = {"killed", "timeout", "caught by type check"}
HASHES = ROOT / "scripts" / "mutation_hashes.json"


def explained(text: str) -> set[str]:
    """Survivor names (or glob patterns of them) listed in docs/mutation.md: each list item
    names one or more, `in backticks`, before its " — " and the reason."""
    names = set()
    for line in text.splitlines():
        if line.startswith("- `") and " — " in line:
            names.update(line.split(" — ", 1)[0].split("`")[1::2])
    return names


def function_of(module: str, mutant: str) -> str:
    """`service.intake.keys.xǁIdempotencyWindowǁget__mutmut_5` → `xǁIdempotencyWindowǁget`."""
    return mutant.removeprefix(module + ".").rsplit("__mutmut_", 1)[0]


def score(
    module: str, meta: dict[str, object], known: set[str], recorded: dict[str, str] | None
) -> tuple[list[str], dict[str, str], int]:
    """The module's line and one per survivor; the current hash of each function with an
    explained survivor (what `--accept` records); how many survivors are unexplained or stale.
    `recorded` None: take every explanation as read (`--accept`)."""
    codes = meta["exit_code_by_key"]
    hashes = meta["hash_by_function_name"]
    assert isinstance(codes, dict) and isinstance(hashes, dict)
    statuses = {name: status_by_exit_code[code] for name, code in codes.items()}
    killed = sum(s in KILLED for s in statuses.values())
    survivors = sorted(n for n, s in statuses.items() if s not in KILLED)
    total = len(statuses)
    lines = [f"{module:32} {total:>7} {killed:>6} {len(survivors):>8} {killed / total:>6.1%}"]
    current: dict[str, str] = {}
    bad = 0
    for name in survivors:
        function = function_of(module, name)
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in known):
            mark = "UNEXPLAINED"
        else:
            current[function] = str(hashes.get(function))
            stale = recorded is not None and recorded.get(function) != current[function]
            mark = "STALE" if stale else "explained"
        bad += mark != "explained"
        lines.append(f"    {statuses[name]:10} {mark:11} {name}")
    return lines, current, bad


def main(args: list[str]) -> int:
    accept = "--accept" in args
    modules = [a for a in args if a != "--accept"]
    known = explained((ROOT / "docs" / "mutation.md").read_text())
    recorded: dict[str, dict[str, str]] = json.loads(HASHES.read_text()) if HASHES.exists() else {}
    print(f"{'module':32} {'mutants':>7} {'killed':>6} {'survived':>8} {'score':>6}")
    bad = 0
    for module in modules:
        meta = json.loads((ROOT / "mutants" / (module.replace(".", "/") + ".py.meta")).read_text())
        unchecked = [n for n, c in meta["exit_code_by_key"].items() if c is None]
        if unchecked:
            print(f"{module}: {len(unchecked)} mutants not checked yet", file=sys.stderr)
        lines, current, module_bad = score(
            module, meta, known, None if accept else recorded.get(module, {})
        )
        print("\n".join(lines))
        bad += module_bad
        if accept:
            recorded[module] = dict(sorted(current.items()))
    if accept:
        text = json.dumps(dict(sorted(recorded.items())), indent=2, ensure_ascii=False)
        HASHES.write_text(text + "\n")
        print(f"recorded the hashes of the functions with explained survivors: {HASHES.name}")
    if bad:
        print(
            "\nUNEXPLAINED: kill it with a test, or explain it in docs/mutation.md."
            "\nSTALE: its function changed since its explanation was read: `mutmut show NAME`, "
            "correct docs/mutation.md, then run this again with --accept.",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
