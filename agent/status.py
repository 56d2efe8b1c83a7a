"""Small JSON files the agent keeps in its state dir: ``status.json`` and ``deployment.json``.

``status.json`` is what ``toco-agent status`` reads (the daemon rewrites it on every change
and every telemetry tick). ``deployment.json`` is the journal of the one deployment in
progress, so a restart after kill -9 knows where it was. Both are written atomically
(temp file, fsync, rename), so a reader sees the old or the new file, never half of one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from toco_core.atomic_files import atomic_write
from toco_core.errors import ConfigError

STATUS_FILE = "status.json"
JOURNAL_FILE = "deployment.json"


class AgentStatus(BaseModel):
    """A snapshot of the running daemon for people and scripts."""

    model_config = ConfigDict(extra="forbid")

    updated_at: float = Field(default_factory=time.time)
    pid: int = Field(default_factory=os.getpid)
    device_id: str
    fleet: str
    running: bool = True
    connected: bool = False
    broker: str = ""
    api_url: str | None = None
    active: dict[str, Any] | None = Field(None, description="bundle_id, slot, version, plan, fallback")
    deployment: dict[str, Any] | None = Field(None, description="last deployment step: id, bundle, phase, reason")
    last_drift: dict[str, Any] | None = Field(None, description="last closed drift window: window, closed_at, "
                                             "n_samples, alert, out_of_band, measured_agreement")
    outbox: int = 0
    inferences: int = 0
    storage: dict[str, Any] | None = Field(None, description="state_dir_bytes, download_bytes (parts received "
                                                             "for the active bundle), shadow (fp32|master|none)")
    refused_commands: dict[str, int] = Field(default_factory=dict, description="commands refused, per reason "
                                             "(unsigned, foreign_device, expired, replay, untrusted_key, "
                                             "bad_signature)")
    trusted_keys: list[str] = Field(default_factory=list, description="fingerprints of the keys trusted for commands")


class Journal(BaseModel):
    """The deployment in progress: enough to finish or report it after a restart."""

    model_config = ConfigDict(extra="forbid")

    deployment_id: str | None = None
    bundle_id: str
    phase: str = "received"
    attempts: int = Field(0, ge=0, description="recompression runs started for this deployment")
    policy: dict[str, Any] = Field(default_factory=dict, description="budget overrides of the command")
    kind: str = Field("deploy", description="deploy or recompress")
    received_before: int = Field(0, ge=0, description="bytes of the bundle's parts received before this deployment")


def write_status(state_dir: Path, status: AgentStatus) -> None:
    """Replace ``status.json`` in the state dir."""
    atomic_write(Path(state_dir) / STATUS_FILE, status.model_dump_json(indent=1).encode())


def read_status(state_dir: Path) -> AgentStatus:
    """Read ``status.json``. Raises ConfigError when the daemon never wrote one or it is unreadable."""
    path = Path(state_dir) / STATUS_FILE
    try:
        return AgentStatus.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"no status file {path}", "start the agent with `toco-agent run` (same --config)") from None
    except (OSError, ValidationError, ValueError) as exc:
        raise ConfigError(f"status file {path} is unreadable: {exc}", "wait for the daemon to rewrite it") from None


def read_journal(state_dir: Path) -> Journal | None:
    """The deployment journal, or None when there is none (or it is unreadable: then it is dropped)."""
    path = Path(state_dir) / JOURNAL_FILE
    try:
        return Journal.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError, ValueError):
        path.unlink(missing_ok=True)
        return None


def write_journal(state_dir: Path, journal: Journal | None) -> None:
    """Replace (or with None remove) the deployment journal."""
    path = Path(state_dir) / JOURNAL_FILE
    if journal is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write(path, journal.model_dump_json().encode())
