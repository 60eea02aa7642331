"""The Dockerfile's own command, without a Docker engine: the final stage's ENTRYPOINT + CMD read
from the file and run as they are (`/usr/bin/tini -- crm-relay serve`: tini from Debian's package,
which scripts/test installs like redis-server; crm-relay from this venv, where the image's PATH
puts /opt/venv/bin), with the file's ENV, on the embedded defaults; its HEALTHCHECK command
passes; SIGTERM to tini ends both with 0. The deployment files agree with that shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from tests.acceptance.test_first_run import free_port

ROOT = Path(__file__).resolve().parents[2]
GRACEFUL_S = 10  # what crm-relay promises for a SIGTERM
VENV_IN_IMAGE = "/opt/venv/bin"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) with continuations joined and comment lines dropped, as Docker does."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def docker_command() -> tuple[list[str], dict[str, str], list[str]]:
    """(ENTRYPOINT + CMD, ENV, HEALTHCHECK command) of the final stage (the last FROM)."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    env: dict[str, str] = {}
    health: list[str] = []
    for keyword, rest in dockerfile_instructions(ROOT / "Dockerfile"):
        if keyword == "FROM":  # a new stage: what earlier stages set does not reach the image
            entrypoint, cmd, env, health = [], [], {}, []
        elif keyword == "ENTRYPOINT":
            entrypoint = json.loads(rest)  # exec form: signals reach the process itself
        elif keyword == "CMD":
            cmd = json.loads(rest)
        elif keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(rest))
        elif keyword == "HEALTHCHECK":
            health = json.loads(rest.split(" CMD ", 1)[1])
    return entrypoint + cmd, env, health


def test_dockerfile_uses_the_exec_form_tini_and_the_console_script() -> None:
    command, env, health = docker_command()
    assert command == ["/usr/bin/tini", "--", "crm-relay", "serve"]
    assert env["LOG_FORMAT"] == "json" and env["PORT"] == "8080"
    assert env["PATH"].split(":")[0] == VENV_IN_IMAGE and "PYTHONPATH" not in env
    assert health[0] == "python" and "/healthz" in health[-1]
    instructions = dockerfile_instructions(ROOT / "Dockerfile")
    final = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    assert ("USER", "10001:10001") in final  # by number, as runAsNonRoot wants it
    assert ("VOLUME", '["/var/lib/crm-relay"]') in final
    assert any(k == "RUN" and "--require-hashes" in r for k, r in instructions)


def image_env(docker_env: dict[str, str]) -> dict[str, str]:
    """The environment the image's command gets, moved onto this machine: the image's PATH with
    its venv replaced by this one; no CRM credentials or database from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMOCRM_", "BITRIX24_"))}
    for var in ("DATABASE_URL", "CRM", "REDIS_URL", "CRM_RELAY_CONFIG", "ADMIN_TOKEN"):
        env.pop(var, None)
    here = str(Path(sys.executable).parent)
    for key, value in docker_env.items():
        value = value.replace("$PATH", os.environ.get("PATH", "")).replace(VENV_IN_IMAGE, here)
        env[key] = value
    # tini is not PID 1 here: as a subreaper it still reaps orphans as it does in the image
    env["TINI_SUBREAPER"] = "1"
    return env


async def test_docker_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    command, docker_env, health = docker_command()
    env = image_env(docker_env)
    assert Path(command[0]).is_file(), (
        f"{command[0]} (the image's init) is not installed: scripts/test installs it with apt "
        "(apt-get install tini)"
    )
    script = shutil.which(command[2], path=env["PATH"])
    assert script, f"{command[2]} is not on the image's PATH moved here: {env['PATH']}"
    port = free_port()
    # the image's data volume and port, moved to this test's own
    env.update(CRM_RELAY_DATA_DIR=str(tmp_path / "data"), PORT=str(port))
    with open(tmp_path / "stderr.log", "wb") as errlog:
        proc = subprocess.Popen(command, env=env, stdout=errlog, stderr=errlog)
        try:
            await _serves(proc, port, health, env)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, GRACEFUL_S + 5)
            log = (tmp_path / "stderr.log").read_text()
            assert code == 0, log[-3000:]
            assert time.monotonic() - t0 < GRACEFUL_S
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    json_lines = [line for line in log.splitlines() if line.startswith("{")]
    assert json_lines, "LOG_FORMAT=json from the Dockerfile gave no JSON log lines"
    assert all("level" in json.loads(line) for line in json_lines)
    assert list((tmp_path / "data" / "run").glob("*.json")) == []  # a clean stop


async def _serves(
    proc: subprocess.Popen[bytes], port: int, health: list[str], env: dict[str, str]
) -> None:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    async with aiohttp.ClientSession() as http:
        while True:
            assert proc.poll() is None, f"exited with {proc.returncode}"
            assert time.monotonic() < deadline, "no /healthz within 90 s"
            try:
                async with http.get(f"{url}/healthz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.25)
    # the image's HEALTHCHECK, as Docker would run it (its `python` is the venv's, by PATH)
    python = shutil.which(health[0], path=env["PATH"])
    assert python, f"no {health[0]} on {env['PATH']}"
    check = subprocess.run([python, *health[1:]], env=env, capture_output=True, timeout=10)
    assert check.returncode == 0, check.stderr.decode()


def test_pm2_and_kubernetes_allow_the_graceful_shutdown() -> None:
    ecosystem = (ROOT / "deploy" / "ecosystem.config.js").read_text()
    node = shutil.which("node")
    if node:  # evaluate the file as PM2 would
        out = subprocess.run(
            [
                node,
                "-e",
                "console.log(JSON.stringify(require(process.argv[1])))",
                str(ROOT / "deploy" / "ecosystem.config.js"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        app = json.loads(out)["apps"][0]
    else:
        app = {
            k: int(v) if v.isdigit() else v.strip('"')
            for k, v in re.findall(r"(\w+): ([\w\"-]+),", ecosystem)
        }
    assert app["script"] == "crm-relay" and app["args"] == "serve"
    assert app["kill_timeout"] > GRACEFUL_S * 1000
    assert app["max_memory_restart"] and app["autorestart"] in (True, "true")

    deployment = (ROOT / "deploy" / "k8s" / "deployment.yaml").read_text()
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", deployment)[1])  # type: ignore[index]
    pre_stop = int(re.search(r'command: \["sleep", "(\d+)"\]', deployment)[1])  # type: ignore[index]
    assert grace > pre_stop + GRACEFUL_S
    assert re.search(r"livenessProbe:\s+httpGet: \{path: /healthz", deployment)
    assert re.search(r"readinessProbe:\s+httpGet: \{path: /readyz", deployment)
    assert "resources:" in deployment and "secretRef: {name: crm-relay}" in deployment
    secret = (ROOT / "deploy" / "k8s" / "secret.yaml").read_text()
    assert "kind: Secret" in secret and "ADMIN_TOKEN" in secret
