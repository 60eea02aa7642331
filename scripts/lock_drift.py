"""Name every installed package whose version differs from the lock given as the argument.

`scripts/test --latest` runs this after installing the newest releases the ranges allow, so a
dependency that moved is named as such before the suite runs against it.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

NOT_LOCKED = {"pip", "setuptools", "wheel", "crm-relay"}  # the venv's own tools and the project
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(lock: str) -> int:
    pinned = {}
    for line in Path(lock).read_text().splitlines():
        if m := PIN.match(line):
            pinned[canonical(m[1])] = m[2]
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    moved = [
        f"  {name}: {pinned[name]} (lock) -> {installed[name]}"
        for name in sorted(pinned)
        if name in installed and installed[name] != pinned[name]
    ]
    new = sorted(set(installed) - set(pinned) - NOT_LOCKED)
    added = [f"  {name} {installed[name]} (not in the lock)" for name in new]
    if moved or added:
        print(f"== moved past {lock}:", *moved, *added, sep="\n")
    else:
        print(f"== nothing moved past {lock}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
