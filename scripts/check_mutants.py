"""Plant each deliberate bug below in the code, one at a time, run the tests that guard it, and
say whether they caught it (KILLED) or not (SURVIVED). The file is always restored.

    .venv/bin/python scripts/check_mutants.py [pytest paths...]   (default: test_promises.py)

Each bug is one that once survived its own tests: a test that still passes with it in place
guards nothing. Exit status 1 when any survives.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = [
    ("the idempotency window never expires", "service/intake/keys.py",
     "        if expires < self._clock():", "        if False:"),
    ("the circuit never opens on 403/401", "service/delivery/outcomes.py",
     '            self.gate.open_circuit(f"{exc.__class__.__name__}: {exc}", decision.delay_s)',
     "            pass"),
    ("the circuit ignores its cool-down", "service/delivery/limits.py",
     "        if self.circuit.is_open and self._clock() < self.circuit.open_until:",
     "        if self.circuit.is_open:"),
    ("key locks taken unsorted", "service/intake/locks.py",
     "        return _Holding(self, sorted(set(keys)))",
     "        return _Holding(self, list(dict.fromkeys(keys)))"),
    ("the spool answers before fsync", "service/intake/spool.py",
     "        os.fsync(self._file.fileno())", "        pass"),
    ("spool entries of an unknown type dropped", "service/intake/spool.py",
     "                await asyncio.to_thread(self._set_aside, left.unknown)\n",
     "                pass\n"),
    ("a pause that begins while callers queue is ignored", "service/delivery/limits.py",
     "            if time.monotonic() < self._paused_until:\n"
     "                self._bucket.release(ticket)",
     "            if False:\n                self._bucket.release(ticket)"),
]  # fmt: skip


def main(tests: list[str]) -> int:
    survived = 0
    for name, relative, original, mutant in MUTANTS:
        path = ROOT / relative
        source = path.read_text()
        if original not in source:
            print(f"{name}: the code it mutates is gone; update this list", file=sys.stderr)
            return 2
        path.write_text(source.replace(original, mutant, 1))
        try:
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", *tests],
                cwd=ROOT, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
        finally:
            path.write_text(source)
        failed = [ln.split(" ")[1] for ln in run.stdout.splitlines() if ln.startswith("FAILED")]
        verdict = "KILLED by " + ", ".join(failed) if run.returncode else "SURVIVED"
        survived += not run.returncode
        print(f"{name}: {verdict}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["tests/unit/test_promises.py"]))
