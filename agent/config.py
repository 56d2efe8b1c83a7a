"""The agent's configuration: one TOML file plus ``TOCO_AGENT_*`` environment overrides.

Precedence: environment > file > defaults. Nested drift settings are overridden with a
double underscore, e.g. ``TOCO_AGENT_DRIFT__WINDOW_MAX_SAMPLES=64``. Sizes take units
("64MB", "2 MiB"), durations too ("5ms"), the fidelity budget "1%" or 0.01
(toco_core.units). Unknown keys are errors, in the file and among ``TOCO_AGENT_*`` variables;
a missing required value names the key and where it could have come from. A dict or nested
section may also be given whole as JSON (``TOCO_AGENT_FAULT_PAUSE='{"activating": 2}'``).

The environment is read here rather than by pydantic-settings: that package (with asyncio
and dotenv) adds about 2.5 MB to the daemon's resident memory for some twenty lines of work.
"""

from __future__ import annotations

import json
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from toco_core.drift import DriftSettings
from toco_core.errors import ConfigError
from toco_core.messages import ID_PATTERN
from toco_core.topics import parse_broker_url
from toco_core.units import parse_duration, parse_fraction, parse_size

ENV_PREFIX = "TOCO_AGENT_"
DEFAULT_PATH = Path("/etc/toco/agent.toml")


def _as_value_error(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a units parser so pydantic reports its ConfigError as a field error."""
    def run(value: Any) -> Any:
        if value is None or value == "":
            return None
        try:
            return parse(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    return run


Size = Annotated[Annotated[int, Field(gt=0)] | None, BeforeValidator(_as_value_error(parse_size))]
Seconds = Annotated[Annotated[float, Field(gt=0)] | None, BeforeValidator(_as_value_error(parse_duration))]


class AgentConfig(BaseModel):
    """Everything one edge box needs to know; every field has a description and bounds."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    device_id: str = Field(pattern=ID_PATTERN, description="this box's id = MQTT username = client id")
    fleet: str = Field("default", pattern=ID_PATTERN, description="fleet name, the topic root toco/v1/{fleet}")
    group: str = Field("default", pattern=ID_PATTERN,
                       description="the group (line, station) this box expects to be in; only reported: the "
                       "server deploys by the group it enrolled the device in and logs a mismatch")
    broker_url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://host[:port] or mqtts://host[:port]")
    username: str | None = Field(None, description="MQTT username (default: from the URL)")
    password: str | None = Field(None, description="MQTT password (default: from the URL)")
    ca_file: Path | None = Field(None, description="CA bundle for mqtts://")
    state_dir: Path = Field(Path("/var/lib/toco-agent"), description="slots, downloads, outbox, status.json")
    public_key: Path = Field(description="the fleet server's Ed25519 public key (PEM), from provisioning; "
                                       "it seeds the trusted key set that key rotation updates (trust.json)")
    memory_cap: Size = Field(None, description="most memory the served model may use, e.g. 64MB")
    storage_cap: Size = Field(None, description="most storage the model's storage form may use, e.g. 2MB")
    latency_cap: Seconds = Field(None, description="p50 latency limit at batch 1, e.g. 5ms")
    bundle_disk_cap: Size = Field(None, description="most disk a bundle download may use (2 x size + 16 MB)")
    fidelity_budget: Annotated[float, BeforeValidator(_as_value_error(parse_fraction))] = Field(
        0.01, gt=0, lt=1, description="max top-1 disagreement with the base model, e.g. 1%")
    objective: Literal["fidelity", "size"] = Field(
        "fidelity", description="fidelity: best predicted fidelity within the caps; size: smallest model within budget")
    recompress_memory: Annotated[int, BeforeValidator(_as_value_error(parse_size))] = Field(
        1536 * 1024**2, gt=0, description="RSS limit of the recompression child process")
    recompress_timeout: float = Field(900.0, gt=0, description="seconds before the recompression child is killed")
    api_host: str = Field("127.0.0.1", description="inference API bind address; loopback unless the line needs it")
    api_port: int = Field(8080, ge=0, le=65535, description="inference API port; 0 picks a free one")
    api_token_file: Path | None = Field(None, description="a file holding the inference API's bearer token "
                                                          "(one line); every route but /v1/health then needs it. "
                                                          "Set it whenever api_host is not loopback")
    threads: int = Field(0, ge=0, le=256, description="onnxruntime intra-op threads; 0 = let it choose")
    trial_runs: int = Field(100, ge=0, le=1_000_000,
                            description="runs a newly activated model is on trial for: a run-time error among "
                                        "them rolls it back to the previous slot and is reported (0 = no trial)")
    drift: DriftSettings = Field(default_factory=DriftSettings, description="drift windows, bands, alerting")
    upload_samples: bool = Field(False, description="send disputed inputs to the server (may hold line data)")
    samples_batch_bytes: Annotated[int, BeforeValidator(_as_value_error(parse_size))] = Field(
        256 * 1024, gt=1024, le=4 * 1024**2, description="size cap of one samples message")
    shadow_min_free_memory: Annotated[int, BeforeValidator(_as_value_error(parse_size))] = Field(
        128 * 1024**2, ge=0, description="run the base model as shadow only while this much memory stays free")
    keep_master: bool = Field(False, description="also fetch every weight part of a parts bundle, so the drift "
                                                 "monitor can shadow the master model (a pruned plan fetches "
                                                 "only the codes it keeps; this costs the rest once)")
    shadow_idle_seconds: float = Field(
        60.0, gt=0, description="drop the shadow (base model) session after this long without traffic")
    telemetry_seconds: float = Field(30.0, ge=0.5, le=3600, description="telemetry interval")
    probe_benchmark: bool = Field(True, description="run the short GEMM benchmark when probing")
    log_verbosity: int = Field(1, ge=0, le=2, description="0 warnings, 1 info, 2 debug")
    fault_pause: dict[str, float] = Field(default_factory=dict,
                                          description="testing only: seconds to pause on entering a phase")

    def validate_broker(self) -> None:
        """Check the broker URL. Raises ConfigError for a malformed one."""
        parse_broker_url(self.broker_url)


def _whole_as_json(name: str) -> bool:
    """Whether field ``name`` is a section or dict, given whole in one variable as JSON."""
    field = AgentConfig.model_fields.get(name)
    ann = field.annotation if field else None
    return typing.get_origin(ann) is dict or (isinstance(ann, type) and issubclass(ann, BaseModel))


def env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``TOCO_AGENT_*`` variables as nested config values (``A__B`` -> ``{"a": {"b": ...}}``).

    Names are case-insensitive. Raises ConfigError for a section or dict that is not valid JSON.
    """
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.upper().startswith(ENV_PREFIX) or len(key) == len(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX):].lower().split("__")
        if len(path) == 1 and _whole_as_json(path[0]):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ConfigError(f"{key} is not valid JSON: {exc}", f"give {path[0]} as a JSON object") from None
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key} sets a key inside {part!r}, which is not a section", "fix the variable name")
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _explain(exc: ValidationError, source: str) -> ConfigError:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err.get("loc", ())) or "config"
    env = ENV_PREFIX + key.upper().replace(".", "__")
    if err.get("type") == "missing":
        return ConfigError(f"missing required value {key!r} in {source}", f"set {key} in the file or {env}")
    if err.get("type") == "extra_forbidden":
        return ConfigError(f"unknown key {key!r} in {source}", "remove it or fix its spelling (see agent/config.py)")
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return ConfigError(f"invalid {key!r} in {source}: {err.get('msg')}{more}", f"fix {key} in the file or {env}")


def read_api_token(path: Path | None) -> str | None:
    """The inference API token from ``path`` (its first line, stripped), or None without a path.

    Raises ConfigError when the file cannot be read or holds no token.
    """
    if path is None:
        return None
    try:
        lines = Path(path).read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the inference API token file {path}: {exc}",
                          "point api_token_file at a readable file holding one token line") from None
    if not lines or not lines[0].strip():
        raise ConfigError(f"the inference API token file {path} is empty", "write one token line into it")
    return lines[0].strip()


def load_config(path: str | Path | None = None, **overrides: Any) -> AgentConfig:
    """Read the TOML file (optional when everything comes from the environment) and apply env overrides.

    ``overrides`` (e.g. from command-line options) win over the file but not over the env.
    Raises ConfigError for an unreadable file, bad TOML, unknown keys, missing or invalid values.
    """
    data: dict[str, Any] = {}
    source = "the environment"
    if path is not None:
        path = Path(path)
        source = f"{path} or the environment"
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist", "pass --config FILE or write it") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}", "check its permissions") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}", "fix the syntax") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    data = _merge(data, env_values(os.environ))
    try:
        config = AgentConfig(**data)
    except ValidationError as exc:
        raise _explain(exc, source) from None
    config.validate_broker()
    return config
