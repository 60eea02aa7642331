"""HTTP request metrics counted in plain dicts render as prometheus_client's own would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from service.ops.metrics import MAX_ROUTE_CHILDREN, HttpRequests

SAMPLES = [
    ("POST", "/api/v1/forms/{form}", 200, 0.0123),
    ("POST", "/api/v1/forms/{form}", 200, 0.005),  # on a bucket's bound: counted in it
    ("POST", "/api/v1/forms/{form}", 413, 0.0001),
    ("GET", "/healthz", 200, 0.0004),
    ("GET", "unmatched", 404, 12.5),  # past the last bound: +Inf only
    ("POST", "/api/v1/forms/{form}", 200, 2.5),
]


def _lines(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(ln for ln in text.splitlines() if "_created" not in ln)


def test_exposition_equals_a_prometheus_counter_and_histogram() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    http = HttpRequests()
    ours.register(http)
    requests = Counter(
        "crm_relay_http_requests", "HTTP requests answered", ["method", "route", "status"],
        registry=theirs,
    )  # fmt: skip
    latency = Histogram(
        "crm_relay_http_request_duration_seconds", "Time to answer an HTTP request",
        ["method", "route"], registry=theirs,
    )  # fmt: skip
    for method, route, status, seconds in SAMPLES:
        http.observe(method, route, status, seconds)
        requests.labels(method, route, str(status)).inc()
        latency.labels(method, route).observe(seconds)
    assert _lines(ours) == _lines(theirs)


def test_label_sets_are_bounded() -> None:
    http = HttpRequests()
    for n in range(MAX_ROUTE_CHILDREN + 50):
        http.observe(f"M{n}", "unmatched", 405, 0.001)
    assert len(http.counts) == MAX_ROUTE_CHILDREN + 1  # the rest under "other"
    assert http.counts[("other", "unmatched", 405)] == 50
