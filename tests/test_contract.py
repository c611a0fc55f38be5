"""The wire contract: round trips, pinned fingerprints, and every way input can be bad."""

from __future__ import annotations

import dataclasses
import json

import msgpack
import pytest

from enersis.common import codec, messages
from enersis.common.codec import JSON, MSGPACK, DecodeError, decode, encode, wrap
from enersis.common.messages import (
    ALL_MESSAGES,
    CommandResult,
    DomainSample,
    MigrateVm,
    NodeTelemetry,
    fingerprint,
)

# Pinned field fingerprints, one per kind and version.  A field change without
# a version bump changes a fingerprint and fails here: bump VERSION (minor for
# an added optional field, major for anything else), then update the pin.
PINNED = {
    "NodeTelemetry@1.0": "11a622b81a8cbf0a",
    "NodeOnline@1.0": "5ea243d62cefd3bc",
    "NodeOffline@1.0": "8aa23c1bd0117d0b",
    "MigrateVm@1.0": "eb36d1a02e016bf1",
    "WakeNode@1.0": "688e80d359b11856",
    "ShutdownNode@1.0": "f0d7cfacce019849",
    "PauseAutomation@1.0": "5dfc81a06b2c83f2",
    "ResumeAutomation@1.0": "cf9f95408003e5f2",
    "SetMode@1.0": "9553f5242c76ca33",
    "DrainNode@1.0": "c2e39a0ef22fa3bc",
    "UndrainNode@1.0": "e47a339dad94d4e3",
    "PinVm@1.0": "6c29a129ada4412b",
    "SetThresholds@1.0": "217c56dc1a905949",
    "ApproveRecommendation@1.0": "28aab29b88e8bd8d",
    "CommandResult@1.0": "9cf2181452f14134",
    "Recommendation@1.0": "6ad9013aefd35457",
}


def sample(cls: type) -> messages.Message:
    """A valid instance of any kind, every field set to a non-default value."""
    values = {
        "node": "node-1", "source": "node-1", "target": "node-2", "vm": "vm-7",
        "command_id": "cmd-42", "mode": "advisory", "status": "succeeded",
        "upper_pct": 85.5, "lower_pct": 12.25, "recommendation_id": "rec-1",
        "command_kind": "MigrateVm", "command": {"vm": "vm-7", "target": "node-2"},
        "details": {"duration_s": 2.5, "downtime_ms": 31, "note": "ok", "live": True},
        "domains": [DomainSample("vm-7", "0b0f7c6e-5f1e-4a4e-9d21-1f2f3a4b5c6d", 1, 2, 1048576, 524288, 12.5, 50.0)],
    }
    hints = messages.type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kw[f.name] = values[f.name]
            continue
        tp = hints[f.name]
        kw[f.name] = {str: f"{f.name}-x", int: 7, float: 3.25, bool: True}.get(tp, f.default)
    if cls is MigrateVm:
        kw["timeout_s"] = 120.0
    return cls(**kw)


@pytest.mark.parametrize("cls", ALL_MESSAGES, ids=lambda c: c.KIND)
@pytest.mark.parametrize("content_type", [MSGPACK, JSON])
def test_every_kind_round_trips(cls, content_type):
    msg = sample(cls)
    msg.validate()
    env = wrap(msg, "test-sender")
    back = decode(encode(env, content_type), content_type, allow_json=True)
    assert back.message == msg
    assert (back.id, back.ts_ms, back.sender, back.version) == (env.id, env.ts_ms, "test-sender", cls.VERSION)


def test_fingerprints_are_pinned():
    current = {f"{cls.KIND}@{cls.VERSION}": fingerprint(cls) for cls in ALL_MESSAGES}
    assert current == PINNED


def test_fingerprint_changes_when_a_field_changes():
    @dataclasses.dataclass(frozen=True)
    class Changed(messages.Message):
        KIND = "WakeNode"
        VERSION = "1.0"
        CATEGORY = "command"
        command_id: str
        node: str
        reason: str = ""
        issued_by: str = "someone-else"  # only a default differs

    assert fingerprint(Changed) != fingerprint(messages.WakeNode)


def test_telemetry_with_50_domains_fits_in_4kb():
    domains = [DomainSample(f"vm-{i:04d}", f"0b0f7c6e-5f1e-4a4e-9d21-{i:012d}", 1, 2, 2097152, 1048576, 12.34, 56.78)
               for i in range(50)]
    t = NodeTelemetry("node-001", 123456, "a5c1e0c2-0d0b-4c7b-8f5e-0e0e0e0e0e0e", True, "QEMU", 16, 2600,
                      67108864, 33554432, 41.5, 43.25, 10.0, 1.0, 5.0, domains, "0.1.0", "")
    size = len(encode(wrap(t, "agent-node-001")))
    assert size <= 4096, size


def test_float32_noise_is_rounded_away():
    msg = CommandResult("c", "MigrateVm", "succeeded", details={}, node="n1")
    t = NodeTelemetry("n1", 1, "b", True, "QEMU", 2, 2000, 1, 1, 12.34, 0.1, 10.0, 1.0, 5.0, [])
    back = decode(encode(wrap(t, "s"))).message
    assert back.cpu_pct == 12.34 and back.cpu_pct_latest == 0.1
    assert decode(encode(wrap(msg, "s"))).message == msg


def _env(body, kind="MigrateVm", version="1.0", **extra):
    return {"kind": kind, "version": version, "body": body, **extra}


GOOD_BODY = {"command_id": "c1", "vm": "vm1", "source": "n1", "target": "n2"}

# Each case: (payload, content type, expected words in the reason)
MALFORMED = {
    "not msgpack": (b"\xc1\xc1\xc1garbage", MSGPACK, "not valid msgpack"),
    "not json": (b'{"kind": "MigrateVm", ', JSON, "not valid JSON"),
    "envelope not a map": (msgpack.packb([1, 2, 3]), MSGPACK, "must be an object"),
    "unknown kind": (json.dumps(_env(GOOD_BODY, kind="FormatDisk")).encode(), JSON, "unknown kind 'FormatDisk'"),
    "unknown major version": (json.dumps(_env(GOOD_BODY, version="2.0")).encode(), JSON, "unsupported major version"),
    "missing field": (json.dumps(_env({"command_id": "c1", "vm": "vm1", "source": "n1"})).encode(), JSON,
                      "missing required field 'target'"),
    "mistyped field": (json.dumps(_env({**GOOD_BODY, "timeout_s": "soon"})).encode(), JSON, "timeout_s: expected a number"),
    "oversize": (json.dumps(_env({**GOOD_BODY, "reason": "x" * 70_000})).encode(), JSON, "exceeds the limit"),
    "impossible values": (json.dumps(_env({**GOOD_BODY, "target": "n1"})).encode(), JSON, "source and target are both"),
    "bad node name": (json.dumps(_env({**GOOD_BODY, "target": "n2; rm -rf /"})).encode(), JSON, "not a valid name"),
    "unsupported content type": (b"<xml/>", "application/xml", "unsupported content_type"),
    "no body": (json.dumps({"kind": "MigrateVm", "version": "1.0"}).encode(), JSON, "'body' is missing"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_payloads_are_refused_with_a_reason(name):
    payload, ctype, words = MALFORMED[name]
    with pytest.raises(DecodeError) as err:
        decode(payload, ctype, allow_json=True, max_bytes=codec.COMMAND_MAX_BYTES)
    assert words in err.value.reason


def test_json_is_refused_where_only_msgpack_is_accepted():
    with pytest.raises(DecodeError, match="JSON is accepted on command queues only"):
        decode(json.dumps(_env(GOOD_BODY)).encode(), JSON, allow_json=False)


def test_operator_json_without_id_or_timestamp_uses_amqp_properties():
    payload = json.dumps(_env(GOOD_BODY)).encode()
    env = decode(payload, None, allow_json=True, props_message_id="m-1", props_timestamp_s=1700000000, props_app_id="ui")
    assert (env.id, env.ts_ms, env.sender) == ("m-1", 1700000000000, "ui")
    assert env.message == MigrateVm(command_id="c1", vm="vm1", source="n1", target="n2")


def test_newer_minor_version_with_extra_fields_is_accepted():
    payload = json.dumps(_env({**GOOD_BODY, "new_optional": 1}, version="1.7")).encode()
    env = decode(payload, JSON, allow_json=True)
    assert env.version == "1.7" and env.message.vm == "vm1"
