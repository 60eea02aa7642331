"""Settings, read once from the environment in `main()` and passed down in slices.

`Settings` is made of one frozen slice per concern (`service.settings.slices`): the app hands
each part the slice it uses (`settings.delivery` to the worker, `settings.crm.amocrm` to the
amoCRM adapter, …). A wrong value stops start-up with one line that names the variable and what
it expects (`SettingsError`); nothing else in the service reads `os.environ`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from service.settings import env as _env
from service.settings.config_file import read_config, with_secret
from service.settings.slices import (
    AdminSettings,
    AlertSettings,
    AmoCrmSettings,
    Bitrix24Settings,
    ClusterSettings,
    CrmSettings,
    DatabaseSettings,
    DeliverySettings,
    FormRule,
    ForwardRule,
    GenericSource,
    HttpSettings,
    IntakeSettings,
    LeadSettings,
    LogSettings,
    RetentionSettings,
    RetryPolicy,
    SpamRule,
    SpamSettings,
    StorageSettings,
    WebhookSettings,
    setting_name,
)

__all__ = [
    "AdminSettings",
    "AlertSettings",
    "AmoCrmSettings",
    "Bitrix24Settings",
    "ClusterSettings",
    "CrmSettings",
    "DatabaseSettings",
    "DeliverySettings",
    "FormRule",
    "ForwardRule",
    "GenericSource",
    "HttpSettings",
    "IntakeSettings",
    "LeadSettings",
    "LogSettings",
    "RetentionSettings",
    "RetryPolicy",
    "Settings",
    "SpamRule",
    "SpamSettings",
    "StorageSettings",
    "WebhookSettings",
    "load_config",
    "setting_name",
]


@dataclass(frozen=True)
class Settings:
    """Everything the service is told from outside, one slice per concern."""

    # CRM_RELAY_DATA_DIR: the embedded database, the spool and the crash markers live here
    data_dir: Path = Path("./var")
    http: HttpSettings = field(default_factory=HttpSettings)
    log: LogSettings = field(default_factory=LogSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    intake: IntakeSettings = field(default_factory=IntakeSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    leads: LeadSettings = field(default_factory=LeadSettings)
    crm: CrmSettings = field(default_factory=CrmSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    alert: AlertSettings = field(default_factory=AlertSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    spam: SpamSettings = field(default_factory=SpamSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from environment variables; raise SettingsError on a bad value."""
        r = _env.EnvReader(env)
        kind = _env.crm_kind(r)
        s = cls(
            database=_env.database(r),
            data_dir=Path(r.text("CRM_RELAY_DATA_DIR") or "./var"),
            cluster=_env.cluster(r),
            crm=_env.crm(r, kind),
            intake=_env.intake(r),
            storage=_env.storage(r),
            alert=_env.alert(r),
            log=_env.log(r),
            http=_env.http(r),
            webhook=_env.webhook(r),
            delivery=_env.delivery(r),
            leads=_env.leads(r),
            admin=_env.admin(r),
            spam=_env.spam(r),
            retention=_env.retention(r),
        )
        _env.check_crm(s.crm)
        path = r.text("CRM_RELAY_CONFIG")
        s = load_config(s, Path(path)) if path else s
        _env.check_lead_fields(s.crm.kind, s.leads)
        return s


def load_config(s: Settings, path: Path) -> Settings:
    """Merge the optional TOML file (per-form rules, forwarding, generic sources) into `s`."""
    found = read_config(path)
    leads = replace(
        s.leads,
        forms={name: with_secret(name, rule, s.spam) for name, rule in found.forms.items()},
        default_pipeline_id=found.pipeline_id or s.leads.default_pipeline_id,
        default_status_id=found.status_id or s.leads.default_status_id,
        default_category_id=(
            found.category_id if found.category_id is not None else s.leads.default_category_id
        ),
        default_stage_id=found.stage_id or s.leads.default_stage_id,
    )
    webhook = replace(
        s.webhook, forward_rules=found.forward_rules, generic_sources=found.generic_sources
    )
    return replace(s, leads=leads, webhook=webhook)
