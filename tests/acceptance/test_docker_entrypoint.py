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
from typing import Any

import aiohttp
import yaml

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


async def test_docker_command_serves_and_stops_on_sigterm(
    tmp_path: Path, embedded_data_dir: Path
) -> None:
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
    env.update(CRM_RELAY_DATA_DIR=str(embedded_data_dir / "data"), PORT=str(port))
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
    assert list((embedded_data_dir / "data" / "run").glob("*.json")) == []  # a clean stop


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


def pm2_app() -> dict[str, Any]:
    """The app as PM2 loads it: the file evaluated by node (there on every machine CI runs on);
    without node, the options written as literals, read from the text."""
    path = ROOT / "deploy" / "ecosystem.config.js"
    node = shutil.which("node")
    if not node:
        pairs = re.findall(r"^\s+(\w+): ([^\n]+?),(?: //.*)?$", path.read_text(), re.M)
        return {k: int(v) if v.isdigit() else v.strip('"') for k, v in pairs}
    out = subprocess.run(
        [node, "-e", "console.log(JSON.stringify(require(process.argv[1])))", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    app: dict[str, Any] = json.loads(out)["apps"][0]
    return app


def test_pm2_runs_the_venv_script_with_one_log_and_the_graceful_shutdown() -> None:
    app = pm2_app()
    assert app["interpreter"] == "none" and app["args"] == "serve"
    assert "crm-relay" in app["script"] and app["exec_mode"] == "fork"
    assert app["kill_timeout"] > GRACEFUL_S * 1000  # PM2: SIGINT, then SIGKILL after this
    assert app["max_memory_restart"] and app["autorestart"] in (True, "true")
    assert app["out_file"] == app["error_file"]  # one log, in the order lines were written
    assert "listen_timeout" not in app or app.get("wait_ready")  # else it does nothing
    if isinstance(app.get("env"), dict):  # evaluated by node: paths resolved
        assert Path(app["cwd"]).is_absolute() and Path(app["script"]).name == "crm-relay"
        assert Path(app["env"]["CRM_RELAY_DATA_DIR"]).is_absolute()


def test_kubernetes_allows_the_graceful_shutdown_and_keeps_secrets_out_of_git() -> None:
    k8s = ROOT / "deploy" / "k8s"
    deployment = yaml.safe_load((k8s / "base" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + GRACEFUL_S
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"] and {"secretRef": {"name": "crm-relay"}} in container["envFrom"]
    # the Secret is generated from a git-ignored env file; only examples are committed
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    for variant in (k8s, k8s / "scaled"):
        kustomization = yaml.safe_load((variant / "kustomization.yaml").read_text())
        (generator,) = kustomization["secretGenerator"]
        assert generator == {**generator, "name": "crm-relay", "envs": ["secret.env"]}
        assert str((variant / "secret.env").relative_to(ROOT)) in ignored
        example = (variant / "secret.env.example").read_text()
        assert re.search(r"^ADMIN_TOKEN=$", example, re.M)  # a name to fill in, no value
    committed = [p for p in k8s.rglob("*.yaml") if "kind: Secret" in p.read_text()]
    assert committed == []
