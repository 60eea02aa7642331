"""The mutation score per module from mutmut's results in mutants/, and every survivor by name
(scripts/mutate runs this after mutmut).

    .venv/bin/python scripts/mutation_score.py service.intake.keys [module ...]

Killed: a test failed, or the mutant hung until mutmut's timeout (a test noticed it never
ends). Survived: every test passed, or no test reached the mutated function. Exit status 1
when a survivor is not in docs/mutation.md (each one there is explained: an equivalent mutant
or a change no promise depends on).
"""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path

from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parent.parent
KILLED = {"killed", "timeout", "caught by type check"}


def explained() -> set[str]:
    """Survivor names (or glob patterns of them) listed in docs/mutation.md: each list item
    names one or more, `in backticks`, before its " — " and the reason."""
    names = set()
    for line in (ROOT / "docs" / "mutation.md").read_text().splitlines():
        if line.startswith("- `") and " — " in line:
            names.update(line.split(" — ", 1)[0].split("`")[1::2])
    return names


def main(modules: list[str]) -> int:
    known = explained()
    unexplained = 0
    print(f"{'module':32} {'mutants':>7} {'killed':>6} {'survived':>8} {'score':>6}")
    for module in modules:
        meta = ROOT / "mutants" / (module.replace(".", "/") + ".py.meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        statuses = {name: status_by_exit_code[code] for name, code in codes.items()}
        unchecked = [n for n, s in statuses.items() if s == "not checked"]
        if unchecked:
            print(f"{module}: {len(unchecked)} mutants not checked yet", file=sys.stderr)
        killed = sum(s in KILLED for s in statuses.values())
        survivors = sorted(n for n, s in statuses.items() if s not in KILLED)
        total = len(statuses)
        print(f"{module:32} {total:>7} {killed:>6} {len(survivors):>8} {killed / total:>6.1%}")
        for name in survivors:
            ok = any(fnmatch.fnmatchcase(name, pattern) for pattern in known)
            mark = "explained" if ok else "UNEXPLAINED"
            unexplained += not ok
            print(f"    {statuses[name]:10} {mark:11} {name}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
