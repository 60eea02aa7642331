"""What `crm-relay serve` says once it listens: version, where, how to send a first lead, where
leads go, the database in use and how to open the dashboard. A block of text for people
(`LOG_FORMAT=text`), one log record with the same facts as fields for machines (`json`)."""

from __future__ import annotations

import logging
import shlex
import sys
from dataclasses import asdict, dataclass
from typing import TextIO
from urllib.parse import urlsplit

from service import __version__
from service.settings import Settings

log = logging.getLogger(__name__)

FIRST_LEAD = {"name": "Test Lead", "phone": "+77011234567"}
ANY_INTERFACE = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class Started:
    """The facts the start-up block states."""

    version: str
    url: str  # where this machine reaches the service
    form_endpoint: str
    curl: str  # a first lead, ready to paste
    crm: str  # simulator | amocrm | bitrix24
    leads_to: str  # the simulator's or the CRM's address (never a secret path)
    crm_state: str | None  # the simulator's state page
    database: str  # embedded with its directory, or DATABASE_URL with the password masked
    admin: str | None  # the dashboard's address, None while ADMIN_TOKEN is unset
    delivery: bool  # this process delivers (not `--no-worker`)


def started(
    settings: Settings,
    *,
    database: str,
    simulator_url: str | None,
    delivery: bool,
) -> Started:
    """The facts for `settings`, the database label and, without a CRM, the simulator's URL."""
    host, port = settings.http.host, settings.http.port
    shown = "localhost" if host in ANY_INTERFACE else (f"[{host}]" if ":" in host else host)
    url = f"http://{shown}:{port}"
    form = f"{url}/api/v1/forms/landing"
    data = " ".join(f"-d {shlex.quote(f'{k}={v}')}" for k, v in FIRST_LEAD.items())
    crm = settings.crm
    if simulator_url is not None:
        leads_to, state = simulator_url, f"{simulator_url}/_sim/state"
    elif crm.kind == "bitrix24":
        leads_to, state = _origin(crm.bitrix24.portal_url or crm.bitrix24.webhook_url), None
    else:
        leads_to, state = _origin(crm.amocrm.base_url), None
    return Started(
        version=__version__,
        url=url,
        form_endpoint=f"POST {url}/api/v1/forms/{{form}}",
        curl=f"curl {data} {form}",
        crm="simulator" if simulator_url is not None else crm.kind,
        leads_to=leads_to,
        crm_state=state,
        database=database,
        admin=f"{url}/admin/" if settings.admin.token else None,
        delivery=delivery,
    )


def _origin(url: str | None) -> str:
    """Scheme and host only: a Bitrix24 webhook URL carries its secret in the path."""
    if not url:
        return "?"
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def block(s: Started) -> list[str]:
    """The lines people read."""
    if s.crm == "simulator":
        leads = (
            f"the IN-PROCESS amoCRM SIMULATOR at {s.leads_to} (state: {s.crm_state}); "
            "set CRM=amocrm and AMOCRM_* for real delivery"
        )
    else:
        leads = f"{s.crm} at {s.leads_to}"
    if not s.delivery:
        leads += " (delivered by other processes: this one runs --no-worker)"
    admin = (
        f"{s.admin} (sign in with ADMIN_TOKEN)"
        if s.admin
        else f"off: set ADMIN_TOKEN to a long random string and restart, then {s.url}/admin/"
    )
    return [
        f"crm-relay {s.version} ready on {s.url}",
        f"  forms     {s.form_endpoint}",
        f"  try it    {s.curl}",
        f"  leads go  to {leads}",
        f"  database  {s.database}",
        f"  admin     {admin}",
        "  health    /healthz, /readyz, /health; Prometheus /metrics",
    ]


def announce(s: Started, fmt: str, stream: TextIO | None = None) -> None:
    """The block on stderr for people; one `startup` record for a JSON log."""
    if fmt == "json":
        facts = asdict(s)
        del facts["curl"]  # for people; its phone would be masked anyway
        log.info("crm-relay ready", extra={"action": "startup", **facts})
        return
    out = stream or sys.stderr
    out.write("\n".join(block(s)) + "\n")
    out.flush()
