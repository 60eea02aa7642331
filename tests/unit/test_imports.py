"""Importing crm-relay changes nothing outside it: no environment variable, no logging set-up.
What the process needs is done explicitly, by main() (prepare_environment, logs.setup) and
create_app (the aiohttp log filter)."""

from __future__ import annotations

import subprocess
import sys

# in a fresh interpreter: this test process has long imported everything
PROBE = """
import importlib, logging, os, pkgutil
import service

def loggers():
    found = {"": logging.getLogger()}
    found.update(logging.Logger.manager.loggerDict)
    return {
        name: (tuple(map(id, lg.filters)), tuple(map(id, lg.handlers)), lg.level)
        for name, lg in found.items() if isinstance(lg, logging.Logger)
    }

environ, seen = dict(os.environ), loggers()
for module in pkgutil.walk_packages(service.__path__, "service."):
    if not module.name.endswith(".__main__"):  # that one runs the program
        importlib.import_module(module.name)
assert dict(os.environ) == environ, set(os.environ.items()) ^ set(environ.items())
now = loggers()
changed = {n: now[n] for n in seen if now[n] != seen[n]}
changed.update({n: v for n, v in now.items() if n not in seen and (v[0] or v[1] or v[2])})
assert not changed, changed
"""


def test_importing_every_module_changes_no_environment_and_no_logging() -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}  # XDG_RUNTIME_DIR unset on purpose
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_create_app_quiets_client_protocol_errors() -> None:
    import logging

    from service.app import create_app
    from service.settings import Settings
    from service.web import CLIENT_PROTOCOL_ERRORS

    server = logging.getLogger("aiohttp.server")
    server.removeFilter(CLIENT_PROTOCOL_ERRORS)
    create_app(Settings())
    create_app(Settings())
    assert server.filters.count(CLIENT_PROTOCOL_ERRORS) == 1
