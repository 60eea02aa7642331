"""Event keys, signatures and the echo rule (webhooks/events.py), and the webhook settings."""

from __future__ import annotations

import base64
import datetime as dt
import random
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

from service.errors import SettingsError
from service.intake.bodies import parse_body
from service.model import LeadChange
from service.settings import ForwardRule, GenericSource, Settings, load_config
from service.webhooks.events import (
    OurWrite,
    amocrm_events,
    bitrix24_event,
    bitrix24_token,
    generic_event,
    is_echo,
    lead_change,
    qstash_token,
    same_secret,
    sign,
    verify_hmac,
    verify_qstash,
)

FORM = "application/x-www-form-urlencoded"


def amo_status(lead_id: int, status_id: int, updated_at: int, n: int = 0) -> dict[str, str]:
    """One `leads[status][n]` item as amoCRM sends it."""
    p = f"leads[status][{n}]"
    return {
        f"{p}[id]": str(lead_id),
        f"{p}[name]": "Заявка с сайта",
        f"{p}[status_id]": str(status_id),
        f"{p}[old_status_id]": "10001",
        f"{p}[price]": "0",
        f"{p}[responsible_user_id]": "5510",
        f"{p}[last_modified]": str(updated_at),
        f"{p}[modified_user_id]": "5510",
        f"{p}[date_create]": "1700000000",
        f"{p}[pipeline_id]": "1000",
        f"{p}[account_id]": "29085955",
        f"{p}[created_at]": "1700000000",
        f"{p}[updated_at]": str(updated_at),
    }


ACCOUNT = {"account[subdomain]": "example", "account[id]": "29085955"}


def parsed(fields: dict[str, str]) -> dict[str, object]:
    return parse_body(FORM, urlencode(fields).encode())


def test_amocrm_body_with_two_status_changes_is_two_events() -> None:
    body = parsed(
        {**amo_status(101, 142, 1700000100, 0), **amo_status(102, 143, 1700000101, 1), **ACCOUNT}
    )
    events = amocrm_events(body)
    assert [(e.kind, e.entity_id) for e in events] == [
        ("leads.status", "101"),
        ("leads.status", "102"),
    ]
    assert events[0].key == "leads.status:101:1700000100:142"
    assert events[0].payload["account"] == {"subdomain": "example", "id": "29085955"}
    assert events[0].payload["data"]["pipeline_id"] == "1000"


def test_amocrm_redelivery_is_the_same_key_and_a_later_change_is_not() -> None:
    first = amocrm_events(parsed({**amo_status(101, 142, 1700000100), **ACCOUNT}))[0]
    again = amocrm_events(parsed({**amo_status(101, 142, 1700000100), **ACCOUNT}))[0]
    later = amocrm_events(parsed({**amo_status(101, 143, 1700000200), **ACCOUNT}))[0]
    same_second = amocrm_events(parsed({**amo_status(101, 143, 1700000100), **ACCOUNT}))[0]
    assert first.key == again.key
    assert len({first.key, later.key, same_second.key}) == 3


def test_amocrm_body_without_entities_is_kept_as_one_event() -> None:
    events = amocrm_events({"hello": "world"})
    assert len(events) == 1 and events[0].kind == "unknown"
    assert events[0].key == amocrm_events({"hello": "world"})[0].key


def test_bitrix24_event_key_and_token_not_kept() -> None:
    raw = urlencode(
        {
            "event": "ONCRMDEALUPDATE",
            "data[FIELDS][ID]": "662",
            "ts": "1700000300",
            "auth[domain]": "example.bitrix24.kz",
            "auth[member_id]": "abc",
            "auth[application_token]": "s3cret",
        }
    ).encode()
    body = parse_body(FORM, raw)
    event = bitrix24_event(body)
    assert bitrix24_token(body) == "s3cret"
    assert event.key == "oncrmdealupdate:662:1700000300"
    assert event.entity_id == "662"
    assert "s3cret" not in repr(event.payload)


def test_generic_keys_in_order_of_trust() -> None:
    body = {"order": {"id": 77}, "type": "paid"}
    assert generic_event({}, body, b"x", "order.id").key == "field:77"
    headers = {"Upstash-Message-Id": "msg_1", "X-Request-Id": "r1"}
    assert generic_event(headers, body, b"x", None).key == "msg:msg_1"
    assert generic_event({"X-Request-Id": "r1"}, body, b"x", "missing").key == "req:r1"
    assert generic_event({}, body, b"x", None).key.startswith("sha256:")
    assert generic_event({}, body, b"x", None).kind == "paid"
    opaque = generic_event({}, None, b"\x00\xff", None)
    assert base64.b64decode(opaque.payload["raw_base64"]) == b"\x00\xff"


def test_hmac_signature_round_trip() -> None:
    assert verify_hmac("k", b"body", sign("k", b"body"))
    assert verify_hmac("k", b"body", sign("k", b"body")[7:].upper())
    assert not verify_hmac("k", b"body!", sign("k", b"body"))
    assert not verify_hmac("other", b"body", sign("k", b"body"))
    assert not verify_hmac("k", b"body", None)
    assert not verify_hmac("k", b"body", "sha256=ключ")
    assert same_secret("abc", "abc") and not same_secret("abc", "abd")
    assert not same_secret(None, "") and not same_secret("", "")


def test_qstash_current_and_next_keys() -> None:
    now = time.time()
    url = "https://relay.example/webhooks/generic/q"
    token = qstash_token("next-key", b'{"a":1}', url, now)
    keys = ("current-key", "next-key")
    other = "https://other.example/webhooks/generic/q"
    assert verify_qstash(token, b'{"a":1}', keys, url=url, now=now)
    assert verify_qstash(qstash_token("current-key", b"", url, now), b"", keys, url=url, now=now)
    # another endpoint of the same Upstash account (the keys are per account): refused
    assert not verify_qstash(token, b'{"a":1}', keys, url=other, now=now)
    assert not verify_qstash(token, b'{"a":2}', keys, url=url, now=now)
    assert not verify_qstash(token, b'{"a":1}', ("current-key",), url=url, now=now)
    assert not verify_qstash(token, b'{"a":1}', keys, url=url + "x", now=now)
    assert not verify_qstash(token, b'{"a":1}', keys, url=url, now=now + 3600)
    assert not verify_qstash(token, b'{"a":1}', keys, url=url, now=now - 3600)
    assert not verify_qstash(token, b'{"a":1}', (None, None), url=url, now=now)


def test_qstash_garbage_tokens_never_raise() -> None:
    rnd = random.Random(4)
    for _ in range(500):
        n = rnd.randrange(0, 80)
        token = "".join(rnd.choice("ab.=-_+/Я\x00 ") for _ in range(n))
        assert verify_qstash(token, b"", ("k",), url=None, now=time.time()) is None


T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


def change(action: str, status: str | None, crm: str = "amocrm") -> LeadChange:
    return LeadChange(crm, 101, action, "1000", status, T0)


def test_echo_rule() -> None:
    ours = [OurWrite(T0 - dt.timedelta(seconds=3), "10001")]
    assert is_echo(change("status", "10001"), ours, 60)
    assert not is_echo(change("status", "142"), ours, 60)  # a manager moved it elsewhere
    assert not is_echo(change("status", "10001"), ours, 1)  # too far from our write
    assert is_echo(change("add", "555"), ours, 60)  # the lead we created
    assert is_echo(change("update", "10001"), ours, 60)
    assert not is_echo(change("update", "142"), ours, 60)
    assert not is_echo(change("status", "10001"), [OurWrite(T0, None)], 60)
    assert is_echo(change("oncrmdealupdate", None, "bitrix24"), [OurWrite(T0, None)], 60)
    assert not is_echo(change("status", "10001"), [], 60)


def test_lead_change_from_events() -> None:
    body = parsed({**amo_status(101, 142, 1700000100), **ACCOUNT})
    event = amocrm_events(body)[0]
    found = lead_change("amocrm", event.kind, event.payload, T0)
    assert found == LeadChange(
        "amocrm", 101, "status", "1000", "142", dt.datetime.fromtimestamp(1700000100, dt.UTC)
    )
    assert lead_change("amocrm", "contacts.add", {"data": {"id": "5"}}, T0) is None
    bitrix = bitrix24_event({"event": "ONCRMDEALUPDATE", "data": {"FIELDS": {"ID": "662"}}})
    found = lead_change("bitrix24", bitrix.kind, bitrix.payload, T0)
    assert found is not None and found.lead_id == 662 and found.changed_at == T0


def test_forward_and_generic_rules_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        '[forward.amocrm]\nurl = "https://a.example/hook"\nrate = 2\n'
        '[forward.generic.shop]\nurls = ["https://b.example/1", "https://b.example/2"]\n'
        '[generic.shop]\nkey_field = "order.id"\nverify = "hmac"\n',
        encoding="utf-8",
    )
    s = load_config(Settings(), path)
    assert s.webhook.forward_rules["amocrm"] == (ForwardRule("https://a.example/hook", 2.0),)
    assert [r.url for r in s.webhook.forward_rules["generic/shop"]] == [
        "https://b.example/1",
        "https://b.example/2",
    ]
    assert s.webhook.generic_sources["shop"] == GenericSource("order.id", "hmac")
    path.write_text('[generic.shop]\nverify = "maybe"\n', encoding="utf-8")
    with pytest.raises(SettingsError, match="verify"):
        load_config(Settings(), path)
    path.write_text('[forward.amocrm]\nurl = "ftp://x"\n', encoding="utf-8")
    with pytest.raises(SettingsError, match=r"forward\.amocrm\.url"):
        load_config(Settings(), path)
