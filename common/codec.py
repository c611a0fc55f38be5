"""One envelope, msgpack on the wire, JSON accepted where a person types.

Envelope (both encodings)::

    {"kind": "MigrateVm", "version": "1.0", "id": "…", "ts_ms": 1764…,
     "sender": "arbiter", "body": {…fields of the kind…}}

On input, `id`, `ts_ms` and `sender` may be left out (an operator pasting
JSON into the management UI rarely sets them): the AMQP message_id, timestamp
and app_id are used, else a fresh id and "now".  Every other problem raises
DecodeError with a reason fit for the dead-letter header.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import types
import typing
import uuid
from dataclasses import dataclass
from typing import Any

import msgpack

from .messages import MESSAGES_BY_KIND, ContractError, Message, Record, type_hints

MSGPACK = "application/msgpack"
JSON = "application/json"
DEFAULT_MAX_BYTES = 256 * 1024
COMMAND_MAX_BYTES = 64 * 1024


class DecodeError(ValueError):
    """A payload that no consumer can act on; `reason` goes to the dead-letter header."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Envelope:
    message: Message
    id: str
    ts_ms: int
    sender: str
    version: str

    @property
    def kind(self) -> str:
        return self.message.KIND


def new_id() -> str:
    return uuid.uuid4().hex


def now_ms() -> int:
    return int(time.time() * 1000)


def wrap(message: Message, sender: str, *, id: str | None = None, ts_ms: int | None = None) -> Envelope:
    return Envelope(message, id or new_id(), now_ms() if ts_ms is None else ts_ms, sender, message.VERSION)


# ---------------------------------------------------------------- encode


def _to_wire(value: Any) -> Any:
    if isinstance(value, Record):
        return [_to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def body_of(message: Message) -> dict[str, Any]:
    return {f.name: _to_wire(getattr(message, f.name)) for f in dataclasses.fields(message)}


def envelope_dict(env: Envelope) -> dict[str, Any]:
    return {
        "kind": env.message.KIND,
        "version": env.message.VERSION,
        "id": env.id,
        "ts_ms": env.ts_ms,
        "sender": env.sender,
        "body": body_of(env.message),
    }


def encode(env: Envelope, content_type: str = MSGPACK) -> bytes:
    data = envelope_dict(env)
    if content_type == MSGPACK:
        # Single floats: percentages and durations need no more, and 50 domains fit in 4 KB.
        return msgpack.packb(data, use_bin_type=True, use_single_float=True)
    if content_type == JSON:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    raise ValueError(f"unsupported content type {content_type!r}")


# ---------------------------------------------------------------- decode


def _is_json(payload: bytes, content_type: str | None) -> bool:
    if content_type:
        ct = content_type.split(";")[0].strip().lower()
        if ct in (JSON, "text/json", "text/plain"):
            return True
        if ct in (MSGPACK, "application/x-msgpack"):
            return False
        raise DecodeError(f"unsupported content_type {content_type!r}: use {MSGPACK} or {JSON}")
    # No content type (the management UI sends none unless told): sniff.
    stripped = payload.lstrip()
    return stripped[:1] in (b"{", b"[")


def _parse(payload: bytes, content_type: str | None, allow_json: bool) -> Any:
    if _is_json(payload, content_type):
        if not allow_json:
            raise DecodeError("JSON is accepted on command queues only; send application/msgpack")
        try:
            return json.loads(payload.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DecodeError(f"payload is not UTF-8 JSON: {exc}") from None
        except json.JSONDecodeError as exc:
            raise DecodeError(f"payload is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"payload is not valid msgpack: {type(exc).__name__}: {exc}") from None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "object"
    if isinstance(tp, type) and issubclass(tp, Record):
        return f"{tp.__name__} [{', '.join(f.name for f in dataclasses.fields(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except DecodeError:
                continue
        raise DecodeError(f"field {where}: expected {_type_name(tp)}, got {type(value).__name__}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise DecodeError(f"field {where}: expected a list, got {type(value).__name__}")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise DecodeError(f"field {where}: expected an object with string keys, got {type(value).__name__}")
        for k, v in value.items():
            if not (v is None or isinstance(v, (str, int, float, bool))):
                raise DecodeError(f"field {where}.{k}: expected a scalar, got {type(v).__name__}")
        return dict(value)
    if tp is typing.Any:
        return value
    if isinstance(tp, type) and issubclass(tp, Record):
        fields = dataclasses.fields(tp)
        if not isinstance(value, list) or len(value) != len(fields):
            raise DecodeError(f"field {where}: expected {_type_name(tp)}, got {value!r:.80}")
        hints = type_hints(tp)
        return tp(*(_convert(v, hints[f.name], f"{where}.{f.name}") for f, v in zip(fields, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DecodeError(f"field {where}: expected true or false, got {type(value).__name__}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise DecodeError(f"field {where}: expected an integer, got {type(value).__name__}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            f = float(value)
            if not math.isfinite(f):
                raise DecodeError(f"field {where}: expected a finite number, got {value!r}")
            return round(f, 4)  # undo float32 noise
        raise DecodeError(f"field {where}: expected a number, got {type(value).__name__}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise DecodeError(f"field {where}: expected a string, got {type(value).__name__}")
    raise TypeError(f"unsupported field type {tp!r}")  # a contract bug, not bad input


def message_from_body(cls: type[Message], body: Any, *, where: str = "body") -> Message:
    if not isinstance(body, dict):
        raise DecodeError(f"{where} of {cls.KIND} must be an object, got {type(body).__name__}")
    hints = type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in body:
            values[f.name] = _convert(body[f.name], hints[f.name], f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise DecodeError(f"{cls.KIND}: missing required field {f.name!r} ({_type_name(hints[f.name])})")
    # Unknown fields are ignored: a newer minor version may add optional ones.
    message = cls(**values)
    try:
        message.validate()
    except ContractError as exc:
        raise DecodeError(str(exc)) from None
    return message


def decode(
    payload: bytes,
    content_type: str | None = None,
    *,
    allow_json: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    props_message_id: str | None = None,
    props_timestamp_s: int | None = None,
    props_app_id: str | None = None,
    accept: frozenset[str] | None = None,
) -> Envelope:
    """Decode one payload or raise DecodeError with a reason a person can act on."""
    if len(payload) > max_bytes:
        raise DecodeError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes} bytes")
    if not payload:
        raise DecodeError("empty payload")
    data = _parse(payload, content_type, allow_json)
    if not isinstance(data, dict):
        raise DecodeError(f"envelope must be an object/map, got {type(data).__name__}")
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise DecodeError("envelope field 'kind' is missing or not a string")
    cls = MESSAGES_BY_KIND.get(kind)
    if cls is None:
        raise DecodeError(f"unknown kind {kind!r}; known kinds: {', '.join(sorted(MESSAGES_BY_KIND))}")
    if accept is not None and kind not in accept:
        raise DecodeError(f"kind {kind!r} does not belong on this queue (accepted here: {', '.join(sorted(accept))})")
    version = data.get("version")
    if not isinstance(version, str) or not _valid_version(version):
        raise DecodeError(f"envelope field 'version' must be a string like \"{cls.VERSION}\", got {version!r}")
    if version.split(".")[0] != cls.VERSION.split(".")[0]:
        raise DecodeError(f"unsupported major version {version!r} of {kind}; this consumer speaks {cls.VERSION}")
    msg_id = data.get("id", props_message_id) or props_message_id or new_id()
    if not isinstance(msg_id, str) or not msg_id or len(msg_id) > 200:
        raise DecodeError("envelope field 'id' must be a non-empty string of at most 200 characters")
    ts_ms = data.get("ts_ms")
    if ts_ms is None:
        ts_ms = props_timestamp_s * 1000 if props_timestamp_s else now_ms()
    if not isinstance(ts_ms, int) or isinstance(ts_ms, bool):
        raise DecodeError("envelope field 'ts_ms' must be an integer (epoch milliseconds)")
    sender = data.get("sender") or props_app_id or "unknown"
    if not isinstance(sender, str):
        raise DecodeError("envelope field 'sender' must be a string")
    if "body" not in data:
        raise DecodeError("envelope field 'body' is missing")
    message = message_from_body(cls, data["body"])
    return Envelope(message, msg_id, ts_ms, sender, version)


def _valid_version(v: str) -> bool:
    parts = v.split(".")
    return len(parts) == 2 and all(p.isdigit() for p in parts)
