"""Start `crm-relay serve` on embedded defaults, post one lead, wait until the in-process
simulator has it, stop the service with SIGTERM and expect exit 0.

Usage: python first_lead.py PATH/TO/crm-relay   (stdlib only; run from any folder)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

READY_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def wait_for(what: str, check: object, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"crm-relay exited with {proc.returncode} before {what}:\n{log.read_text()}")
        if callable(check) and check():
            return
        time.sleep(0.2)
    sys.exit(f"no {what} within {READY_S} s:\n{log.read_text()}")


def main(exe: str) -> int:
    root = Path(tempfile.mkdtemp(prefix="crm-relay-first-lead-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMOCRM_", "BITRIX24_"))}
    for var in ("DATABASE_URL", "CRM", "REDIS_URL", "CRM_RELAY_CONFIG", "PYTHONPATH"):
        env.pop(var, None)
    env.update(CRM_RELAY_DATA_DIR=str(root / "var"), PORT=str(port), HOST="127.0.0.1")
    log = root / "crm-relay.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, "serve"], env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("/readyz 200", lambda: get(f"{url}/readyz")[0] == 200, proc, log)
        banner = re.search(r"IN-PROCESS amoCRM SIMULATOR at (\S+)", log.read_text())
        if not banner:
            sys.exit(f"no simulator banner:\n{log.read_text()}")
        body = json.dumps({"name": "Асель", "phone": "8 701 555 44 33"}).encode()
        request = urllib.request.Request(
            f"{url}/api/v1/forms/landing", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            answer = json.loads(r.read())
        if not answer.get("ok"):
            sys.exit(f"the lead was refused: {answer}")

        def delivered() -> bool:
            status, state = get(f"{banner.group(1)}/_sim/state")
            return status == 200 and len(json.loads(state)["leads"]) == 1

        wait_for("delivered lead", delivered, proc, log)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        if code != 0:
            sys.exit(f"crm-relay exited with {code} after SIGTERM:\n{log.read_text()}")
        print(f"lead {answer['id']} stored and delivered; SIGTERM -> exit 0")
        return 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
