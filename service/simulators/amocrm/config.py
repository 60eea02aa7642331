"""How the simulated amoCRM account behaves: its limits, tokens and faults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SimulatorConfig:
    """How the simulated account behaves; mutable while the simulator runs."""

    rate_limit: int = 7  # max requests in any sliding 1-second window
    block_after: int = 20  # this many 429s within block_window_s block the account (403)
    block_window_s: float = 60.0
    access_token: str = "sim-access-token"  # long-lived token, valid until expire_tokens()
    client_id: str = "sim-client"
    client_secret: str = "sim-secret"
    # the integration's redirect URI: a refresh must send it (CRM_FACTS "amoCRM OAuth refresh";
    # amoCRM's OAuth guide lists redirect_uri among the refresh request's required fields)
    redirect_uri: str = "https://relay.example/oauth"
    refresh_token: str = "sim-refresh-0"  # the first valid refresh token (single-use)
    token_ttl_s: float = 86400.0
    latency_s: float = 0.0  # added to every API answer
    error_rate: float = 0.0  # fraction answered 500/502/503/504 without doing the work
    timeout_rate: float = 0.0  # fraction that hang for hang_s after doing the work
    hang_s: float = 60.0
    reset_rate: float = 0.0  # fraction whose connection is dropped after doing the work
    merge_duplicates: bool = False  # amoCRM's own duplicate control on leads/complex
    seed: int | None = None
