"""The topic scheme ``toco/v1/{fleet}/...``, built and parsed in this one place.

Device topics:  ``devices/{device}/{state|telemetry|status|drift|samples|cmd}``
Bundle topics:  ``bundles/{bundle}/manifest``, ``bundles/{bundle}/get/{device}``,
                ``bundles/{bundle}/chunk/{i}``, ``bundles/{bundle}/part/{device}``

The chunk request carries the requesting device in the topic (not only in the payload) so
that a mosquitto ACL pattern can pin it to the client's own name. ``DELIVERY`` holds the
QoS / retain / persisted-outbox choice per kind, so the agent and the server cannot disagree.
Also here: broker URL parsing (mqtt:// and mqtts://) and the mosquitto ACL lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from toco_core.errors import ConfigError
from toco_core.messages import ID_PATTERN, SHA256_PATTERN, MessageError, MessageKind

ROOT = "toco/v1"
DEVICE_KINDS = (MessageKind.STATE, MessageKind.TELEMETRY, MessageKind.STATUS, MessageKind.DRIFT,
                MessageKind.SAMPLES, MessageKind.CMD)
_ID = re.compile(ID_PATTERN)
_SHA = re.compile(SHA256_PATTERN)


class Delivery(NamedTuple):
    """How one kind travels: MQTT QoS, retained or not, kept in the agent's outbox while offline."""

    qos: int
    retain: bool
    durable: bool


DELIVERY: dict[MessageKind, Delivery] = {
    MessageKind.STATE: Delivery(1, True, False),       # re-sent as the birth on every connect
    # QoS 1 although the next point replaces a lost one: a replica killed mid-run left its share of QoS 0
    # telemetry to be dropped by the broker until the survivor drained its session (docs/protocol.md)
    MessageKind.TELEMETRY: Delivery(1, False, False),
    MessageKind.STATUS: Delivery(1, False, True),
    MessageKind.DRIFT: Delivery(1, False, True),
    MessageKind.SAMPLES: Delivery(1, False, True),
    MessageKind.CMD: Delivery(1, False, False),
    MessageKind.MANIFEST: Delivery(1, True, False),
    MessageKind.GET: Delivery(1, False, False),        # re-requested after a reconnect anyway
    # chunks and part frames go out at QoS 0: downloaders subscribe at QoS 0 and ask again for what does not
    # arrive, so QoS 1 would only spend the server's packet ids (65,535 in flight at most) and broker state;
    # thousands of boxes fetching at once used them all up and the server's commands were refused
    MessageKind.CHUNK: Delivery(0, False, False),
    MessageKind.PART: Delivery(0, False, False),
}


class ParsedTopic(NamedTuple):
    """A topic taken apart; fields that the kind does not use are None."""

    kind: MessageKind
    device_id: str | None = None
    bundle_id: str | None = None
    index: int | None = None  # type: ignore[assignment]  # the field shadows tuple.index on purpose


def check_id(value: str, what: str = "device id") -> str:
    """Return ``value`` if it is a safe topic level (letters, digits, ``_.-``, 1-64), else raise ConfigError."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ConfigError(f"{what} {value!r} is not usable in MQTT topics",
                          "use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return value


@dataclass(frozen=True)
class Topics:
    """All topic names of one fleet; ``+`` is accepted where a subscription filter is wanted."""

    fleet: str

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet name")

    @property
    def prefix(self) -> str:
        """``toco/v1/{fleet}``."""
        return f"{ROOT}/{self.fleet}"

    def device(self, kind: MessageKind | str, device_id: str = "+") -> str:
        """``.../devices/{device_id}/{kind}`` for the six device kinds."""
        kind = MessageKind(kind)
        if kind not in DEVICE_KINDS:
            raise ConfigError(f"{kind.value!r} is not a device topic", f"use one of {[k.value for k in DEVICE_KINDS]}")
        return f"{self.prefix}/devices/{device_id}/{kind.value}"

    def manifest(self, bundle_id: str = "+") -> str:
        """``.../bundles/{bundle_id}/manifest`` (retained)."""
        return f"{self.prefix}/bundles/{bundle_id}/manifest"

    def get(self, bundle_id: str = "+", device_id: str = "+") -> str:
        """``.../bundles/{bundle_id}/get/{device_id}``: a device asks for chunks."""
        return f"{self.prefix}/bundles/{bundle_id}/get/{device_id}"

    def chunk(self, bundle_id: str = "+", index: int | str = "+") -> str:
        """``.../bundles/{bundle_id}/chunk/{index}``: one chunk, seen by every downloader of the bundle."""
        return f"{self.prefix}/bundles/{bundle_id}/chunk/{index}"

    def part(self, bundle_id: str = "+", device_id: str = "+") -> str:
        """``.../bundles/{bundle_id}/part/{device_id}``: the ranges one device asked for, seen by it alone."""
        return f"{self.prefix}/bundles/{bundle_id}/part/{device_id}"

    def server_events(self) -> str:
        """``.../server/events``: fleet server replicas share their dashboard events here (no device reads it)."""
        return f"{self.prefix}/server/events"

    def parse(self, topic: str) -> ParsedTopic:
        """Take a concrete topic of this fleet apart. Raises MessageError for anything else."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise MessageError(f"topic {topic!r} is not under {head}", "check the fleet name")
        parts = topic[len(head):].split("/")
        if (len(parts) == 3 and parts[0] == "devices" and _ID.fullmatch(parts[1])
                and parts[2] in {k.value for k in DEVICE_KINDS}):
            return ParsedTopic(MessageKind(parts[2]), device_id=parts[1])
        if len(parts) >= 3 and parts[0] == "bundles" and _SHA.fullmatch(parts[1]):
            rest = parts[2:]
            if rest == ["manifest"]:
                return ParsedTopic(MessageKind.MANIFEST, bundle_id=parts[1])
            if len(rest) == 2 and rest[0] == "get" and _ID.fullmatch(rest[1]):
                return ParsedTopic(MessageKind.GET, device_id=rest[1], bundle_id=parts[1])
            if len(rest) == 2 and rest[0] == "part" and _ID.fullmatch(rest[1]):
                return ParsedTopic(MessageKind.PART, device_id=rest[1], bundle_id=parts[1])
            if len(rest) == 2 and rest[0] == "chunk" and rest[1].isdigit() and len(rest[1]) < 9:
                return ParsedTopic(MessageKind.CHUNK, bundle_id=parts[1], index=int(rest[1]))
        raise MessageError(f"topic {topic!r} does not follow the toco/v1 scheme", "see docs/protocol.md")

    def acl_lines(self, server_user: str = "toco-server", *more_server_users: str) -> list[str]:
        """mosquitto ACL lines: each device (MQTT username = device id = client id) only its own topics.

        ``%u`` is the authenticated username, so a device cannot pose as another by choosing a
        client id. Each server user (one per fleet server replica: the broker makes the client id
        the username, so replicas cannot share one) may read and write the whole fleet tree.
        """
        p = self.prefix
        lines = []
        for user in (server_user, *more_server_users):
            lines += [f"user {user}", f"topic readwrite {p}/#", ""]
        for kind in (MessageKind.STATE, MessageKind.TELEMETRY, MessageKind.STATUS, MessageKind.DRIFT,
                     MessageKind.SAMPLES):
            lines.append(f"pattern write {p}/devices/%u/{kind.value}")
        lines += [f"pattern read {p}/devices/%u/cmd", f"pattern read {p}/bundles/+/manifest",
                  f"pattern write {p}/bundles/+/get/%u", f"pattern read {p}/bundles/+/chunk/+",
                  f"pattern read {p}/bundles/+/part/%u"]
        return lines


class BrokerUrl(NamedTuple):
    """A parsed ``mqtt://`` or ``mqtts://`` URL; credentials may come from the URL or the config."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_broker_url(url: str) -> BrokerUrl:
    """``mqtt://[user:pass@]host[:1883]`` or ``mqtts://host[:8883]``. Raises ConfigError otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r} is malformed: {exc}", "write e.g. mqtt://127.0.0.1:1883") from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"broker URL {url!r} needs the scheme mqtt:// or mqtts:// and a host",
                          "write e.g. mqtt://127.0.0.1:1883 or mqtts://broker.example:8883")
    if parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"broker URL {url!r} has a path or query", "give only scheme, host and port")
    tls = parts.scheme == "mqtts"
    return BrokerUrl(parts.hostname, port or (8883 if tls else 1883), tls,
                     unquote(parts.username) if parts.username else None,
                     unquote(parts.password) if parts.password else None)
