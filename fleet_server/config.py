"""Server configuration: one strict pydantic-settings model (keywords, env ``TOCO_FLEET_*``, a TOML file).

Every field has a default that works on one machine, a description and bounds; unknown
keys are refused (``extra="forbid"``) so a typo never silently falls back to a default.
``load_settings`` reads a TOML file (``toco-fleet serve --config``); the environment overrides
the file, and command-line flags override both.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from toco_core.analysis.settings import AnalysisSettings
from toco_core.errors import ConfigError
from toco_core.topics import check_id, parse_broker_url


class FleetSettings(BaseSettings):
    """Everything ``toco-fleet serve`` can be told."""

    model_config = SettingsConfigDict(env_prefix="TOCO_FLEET_", extra="forbid", env_nested_delimiter="__")

    fleet: str = Field("default", description="fleet name: the MQTT topic root is toco/v1/{fleet}")
    data_dir: Path = Field(Path("fleet-data"), description="database, models, analyses, bundles and keys live here")
    db_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///{data_dir}/fleet.db")
    broker: str = Field("embedded", description="'embedded' (amqtt in process) or mqtt://host:port / mqtts://host:port")
    broker_host: str = Field("127.0.0.1", description="where the embedded broker listens; any address but "
                             "127.0.0.1 needs broker_password_file")
    broker_port: int = Field(1883, ge=1, le=65535, description="port of the embedded broker")
    broker_password_file: Path | None = Field(None, description="the embedded broker's users (user:argon2-hash "
                                              "lines, fleet_server.broker.password_line); None: anonymous, "
                                              "loopback only")
    mqtt_username: str | None = Field(None, description="the server's own MQTT user (the ACL's server user, "
                                      "toco-server); never a device's")
    mqtt_password: str | None = Field(None, description="its password; prefer mqtt_password_file")
    mqtt_password_file: Path | None = Field(None, description="file whose first line is the server's MQTT password")
    mqtt_ca_file: str | None = Field(None, description="CA bundle that signed the broker's certificate (mqtts://)")
    key_path: Path | None = Field(None, description="Ed25519 signing key (PEM, 0600); "
                                                    "default {data_dir}/keys/server.pem")
    command_ttl_s: float = Field(3600.0, gt=0, description="seconds a signed command stays valid: a device refuses it "
                                                            "later (an offline device's queued commands expire)")
    http_host: str = Field("127.0.0.1", description="HTTP bind address")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP port (0 = any free port)")
    deploy_timeout_s: float = Field(120.0, gt=0, description="a device silent this long during a deployment is failed")
    overview_counts_max_age_s: float = Field(2.0, ge=0, le=60, description="the overview's device counts are "
                                             "reused for up to this long while this replica changes no counted "
                                             "value; another replica's changes show within it (0: count every time)")
    canary_share: float = Field(0.1, gt=0, le=1,
                                description="default share of a deployment's devices in the canary wave")
    failure_threshold: float = Field(0.2, ge=0, le=1, description="default failure share that stops a deployment")
    drift_policy: Literal["auto", "approval"] = Field("auto",
                                                      description="re-analyse on drift at once or after approval")
    budget: float = Field(0.01, gt=0, lt=1, description="fleet fidelity budget: max disagreement with the base")
    samples_wait_s: float = Field(10.0, ge=0, description="how long a re-analysis waits for requested field samples")
    reanalysis_min_interval_s: float = Field(600.0, ge=0, description="minimum seconds between two re-analyses "
                                             "of one (model, group); a trigger sooner is held (cooldown)")
    reanalysis_daily_cap: int = Field(6, ge=0, description="re-analyses of one model started in any 24 hours at most")
    quorum_share: float = Field(0.5, gt=0, le=1, description="share of a group's online devices whose fidelity "
                                "alerts a group redeploy needs")
    quorum_min: int = Field(2, ge=1, description="devices a group redeploy needs at least")
    quorum_count: int | None = Field(None, ge=1, description="a fixed number of devices instead of quorum_share")
    analysis_concurrency: int = Field(1, ge=1, le=16, description="analysis worker processes (with a Dask "
                                      "executor: analyses submitted to the cluster at a time)")
    executor: str = Field("local", description="where analyses run: 'local' (worker processes of this server) or "
                          "a Dask scheduler's address, tcp://HOST:PORT (docs/analysis_cluster.md)")
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings, description="defaults of every analysis")
    chunk_size: int = Field(256 * 1024, ge=64 * 1024, le=256 * 1024, description="bundle chunk size, bytes")
    tick_s: float = Field(1.0, gt=0, le=60, description="period of the deployment/drift housekeeping loop")
    telemetry_keep: int = Field(500, ge=10, description="telemetry points kept per device; older ones are deleted "
                                "by the retention housekeeping")
    drift_keep: int = Field(2000, ge=10, description="drift windows kept per device; older ones are deleted by the "
                            "retention housekeeping")
    drift_keep_days: float = Field(30.0, gt=0, description="days a device's drift windows are kept at most")
    bundles_keep: int = Field(3, ge=1, description="bundles kept per model version besides those a device runs or "
                              "an unfinished deployment sends; older ones are deleted by the retention housekeeping")
    bundle_min_age_days: float = Field(7.0, ge=0, description="days a superseded bundle is kept at least")
    events_keep_days: float = Field(90.0, gt=0, description="days the event log (GET /api/event-log) keeps an event")
    retention_interval_s: float = Field(60.0, gt=0, le=86400, description="period of the retention housekeeping")
    retention_cycle_s: float = Field(600.0, gt=0, le=7 * 86400, description="seconds within which the retention "
                                     "housekeeping trims every device once: each run takes its share of the devices")
    replicas: bool = Field(False, description="this serve is one of several replicas sharing one PostgreSQL "
                           "database and one external broker (docs/design_notes.md, Replicas)")
    replica_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
                            description="this replica's name in logs, /health and its MQTT client id "
                            "[hostname-pid]")
    lease_check_s: float = Field(2.0, gt=0, le=60, description="how often a replica checks (or tries to take) "
                                 "the leader lease of the singleton duties")
    mqtt_session_expiry_s: int = Field(60, ge=0, le=7 * 86400,
                                       description="seconds the external broker keeps this server's MQTT session "
                                       "(MQTT 5) after it vanished: a restart within them receives the device "
                                       "messages it had not stored; 0: a clean MQTT 3.1.1 session, as before "
                                       "(docs/design_notes.md, Acknowledge after commit)")
    mqtt_peer_password_dir: Path | None = Field(None, description="directory of the replicas' MQTT passwords, "
                                                "one {user}.password each: the leader logs in as a dead replica's "
                                                "user to drain its broker-held session (fleet_server.session_drain)")
    session_drain_grace_s: float = Field(5.0, ge=0, le=3600, description="seconds a replica's database session "
                                         "must stay gone before the leader takes over and drains its MQTT session")
    session_drain_quiet_s: float = Field(2.0, gt=0, le=600, description="seconds without a message (and with "
                                         "every one stored) after which a session drain ends the dead session")
    identity_wait_s: float = Field(300.0, ge=0, le=86400, description="seconds a restarted replica waits while the "
                                   "leader drains its previous MQTT session, before it gives up and exits")
    trusted_hosts: list[str] = Field(default_factory=list, description="Host header values the HTTP API answers, "
                                     "besides localhost, 127.0.0.1 and http_host (DNS rebinding guard); "
                                     "'*.example.com' allows subdomains")
    max_upload_bytes: int = Field(512 << 20, ge=1 << 20, le=64 << 30,
                                  description="largest POST /api/models body (model + pool), bytes; beyond it: 413")
    max_body_bytes: int = Field(1 << 20, ge=64 << 10, le=64 << 20,
                                description="largest body of any other request (JSON), bytes; beyond it: 413")

    @field_validator("fleet")
    @classmethod
    def _fleet_is_topic_safe(cls, v: str) -> str:
        check_id(v, "fleet name")
        return v

    @field_validator("replica_id")
    @classmethod
    def _replica_id_is_topic_safe(cls, v: str) -> str:
        # it ends up in the MQTT client id (toco-fleet-{fleet}-{replica_id}) and in logs
        return check_id(v, "replica id")

    @field_validator("executor")
    @classmethod
    def _executor_address(cls, v: str) -> str:
        if v == "local":
            return v
        scheme, _, rest = v.partition("://")
        host, _, port = rest.rpartition(":")
        if scheme not in ("tcp", "tls") or not host or not port.isdigit():
            raise ConfigError(f"executor {v!r} is neither 'local' nor a Dask scheduler address",
                              "give tcp://HOST:PORT (the scheduler's default port is 8786)")
        return v

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, v: str) -> str:
        if v != "embedded":
            parse_broker_url(v)  # raises ConfigError with the fix
        return v

    @property
    def broker_password(self) -> str | None:
        """The server's MQTT password in effect: ``mqtt_password``, else the first line of ``mqtt_password_file``.

        Raises ConfigError when the file cannot be read or is empty.
        """
        if self.mqtt_password is not None or self.mqtt_password_file is None:
            return self.mqtt_password
        try:
            lines = self.mqtt_password_file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read the MQTT password file {self.mqtt_password_file}: {exc.strerror}",
                              "check --mqtt-password-file") from None
        if not lines or not lines[0].strip():
            raise ConfigError(f"the MQTT password file {self.mqtt_password_file} is empty",
                              "put the server's password on its first line")
        return lines[0].strip()

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL in effect."""
        return self.db_url or f"sqlite:///{(self.data_dir / 'fleet.db').resolve()}"

    @property
    def allowed_hosts(self) -> list[str]:
        """Every Host the HTTP API answers: localhost, 127.0.0.1, the bind address unless it is a wildcard
        (0.0.0.0 or ::, which no client sends), and ``trusted_hosts``."""
        hosts = ["localhost", "127.0.0.1"]
        if self.http_host not in ("0.0.0.0", "::", ""):
            hosts.append(self.http_host)
        return list(dict.fromkeys(hosts + self.trusted_hosts))

    @property
    def session_key_path(self) -> Path:
        """The key signing dashboard session cookies: {data_dir}/keys/session.key (made on first start)."""
        return self.data_dir / "keys" / "session.key"

    @property
    def uploads_dir(self) -> Path:
        """Where uploads are received before they are accepted: {data_dir}/uploads."""
        return self.data_dir / "uploads"

    @property
    def signing_key_path(self) -> Path:
        """The private key's path in effect."""
        return self.key_path or self.data_dir / "keys" / "server.pem"


def load_settings(config_file: Path | None = None, **flags: Any) -> FleetSettings:
    """The server's settings: ``flags`` (given command-line options) over ``TOCO_FLEET_*`` over the TOML file.

    Takes the TOML file (None: none; its keys are FleetSettings' fields) and the options given.
    Returns the settings. Raises ConfigError for a missing file or a file that is not TOML, and
    pydantic's ValidationError for an unknown key or a bad value.
    """
    if config_file is None:
        return FleetSettings(**flags)
    if not config_file.is_file():
        raise ConfigError(f"no config file at {config_file}", "check --config")

    class _WithFile(FleetSettings):
        model_config = SettingsConfigDict(toml_file=config_file)

        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings: PydanticBaseSettingsSource,
                                       env_settings: PydanticBaseSettingsSource, dotenv_settings, file_secret_settings):
            return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    try:
        return _WithFile(**flags)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_file} is not valid TOML: {exc}", "see deploy/README.md for an example") from None
