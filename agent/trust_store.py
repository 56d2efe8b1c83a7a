"""What the agent trusts and has taken, kept in ``{state_dir}/trust.json`` (atomic writes, survives kill -9).

- the key set: the Ed25519 keys whose signatures it accepts on commands and bundle manifests,
  seeded from the provisioned public key and replaced by signed trust-keys commands (rotation);
- the highest command sequence accepted (a command not above it is a replay);
- per model, the highest bundle sequence accepted, and the sequence of each bundle admitted
  (anti-rollback: an older bundle is refused unless a signed rollback command named it);
- the refused commands per reason, for ``toco-agent status`` and telemetry.

No cryptography here: keys are kept as hex; the signatures are checked in a child task.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from toco_core.atomic_files import atomic_write
from toco_core.errors import ConfigError
from toco_core.messages import BundleManifest, TrustedKey

log = logging.getLogger("toco.agent.trust")
TRUST_FILE = "trust.json"
MAX_REMEMBERED_BUNDLES = 64  # bundle -> sequence entries kept; older ones are forgotten (and count as 0)
MAX_ALLOWED_ROLLBACKS = 16


class TrustState(BaseModel):
    """The content of trust.json."""

    model_config = ConfigDict(extra="forbid")
    provisioned: str = Field(description="fingerprint of the config's public key the key set was seeded from")
    keys: list[TrustedKey] = Field(min_length=1)
    highest_command: int = Field(0, ge=0, description="highest command sequence accepted")
    models: dict[str, int] = Field(default_factory=dict, description="model id -> highest bundle sequence accepted")
    bundles: dict[str, tuple[str | None, int]] = Field(default_factory=dict,
                                                       description="bundle id -> (model id, sequence) when admitted")
    allowed_rollbacks: list[str] = Field(default_factory=list, description="older bundles a signed rollback named")
    refused: dict[str, int] = Field(default_factory=dict, description="commands refused, per reason")


def bundle_sequence(manifest: BundleManifest) -> tuple[str | None, int]:
    """(model id, sequence) of a manifest; one without a sequence (an older server's) counts as sequence 0."""
    return manifest.model_id, manifest.sequence or 0


class TrustStore:
    """trust.json, loaded once and rewritten on every change; thread-safe."""

    def __init__(self, state_dir: Path, provisioned: TrustedKey) -> None:
        """Load trust.json, or seed it with ``provisioned`` (the config's public key).

        A key set seeded from another key than ``provisioned`` means the box was provisioned again
        (say, after missing a rotation): the set restarts from the new key, the counters stay.
        Raises ConfigError when trust.json exists but is unreadable (never silently trust anew).
        """
        self.path = Path(state_dir) / TRUST_FILE
        self._lock = threading.Lock()
        try:
            state = TrustState.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            state = TrustState(provisioned=provisioned.fingerprint, keys=[provisioned])
        except (OSError, ValidationError, ValueError) as exc:
            raise ConfigError(f"{self.path} is unreadable: {exc}",
                              "restore it, or delete it to trust the provisioned key alone (replay and "
                              "downgrade history is lost then)") from None
        if state.provisioned != provisioned.fingerprint:
            log.warning("provisioned public key changed; trusting it alone from now on",
                        extra={"fields": {"was": state.provisioned, "now": provisioned.fingerprint}})
            state = state.model_copy(update={"provisioned": provisioned.fingerprint, "keys": [provisioned]})
        self.state = state
        self._save()

    def _save(self) -> None:
        atomic_write(self.path, self.state.model_dump_json(indent=1).encode())

    def _update(self, **fields: Any) -> None:
        with self._lock:
            self.state = self.state.model_copy(update=fields)
            self._save()

    # ---- keys and commands ------------------------------------------------------------------
    def fingerprints(self) -> list[str]:
        """Fingerprints of the trusted keys."""
        return [k.fingerprint for k in self.state.keys]

    def replace_keys(self, keys: list[TrustedKey]) -> None:
        """Trust exactly ``keys`` from now on (a verified trust-keys command)."""
        self._update(keys=list(keys))

    def accept_command(self, sequence: int) -> None:
        """Record ``sequence`` as the highest accepted (after every other check passed)."""
        self._update(highest_command=max(self.state.highest_command, sequence))

    def count_refusal(self, reason: str) -> None:
        """Count one refused command under ``reason``."""
        refused = dict(self.state.refused)
        refused[reason] = refused.get(reason, 0) + 1
        self._update(refused=refused)

    # ---- bundles (anti-rollback) ------------------------------------------------------------
    def allow_rollback(self, bundle_id: str) -> None:
        """A signed rollback command named ``bundle_id``: admit it although it is older."""
        allowed = [b for b in self.state.allowed_rollbacks if b != bundle_id] + [bundle_id]
        self._update(allowed_rollbacks=allowed[-MAX_ALLOWED_ROLLBACKS:])

    def downgrade(self, bundle_id: str, model_id: str | None, sequence: int) -> str | None:
        """Why a bundle of ``model_id`` at ``sequence`` is refused as a downgrade, or None when it may be taken.

        A bundle without a model id (an older server's) is compared with every model: once the box
        took a sequenced bundle, an unsequenced one is older than it.
        """
        state = self.state
        if bundle_id in state.allowed_rollbacks:
            return None
        highest = state.models.get(model_id, 0) if model_id is not None else max(state.models.values(), default=0)
        if sequence >= highest:
            return None
        return (f"bundle {bundle_id[:12]} has sequence {sequence} for model {model_id or '(none)'}, below the "
                f"{highest} this device already took; only a signed rollback naming it may bring it back")

    def admit_manifest(self, manifest: BundleManifest) -> str | None:
        """Check a signature-verified manifest for a downgrade and, when it passes, record its sequence.

        Returns the refusal's detail, or None when admitted.
        """
        model_id, seq = bundle_sequence(manifest)
        why = self.downgrade(manifest.bundle_id, model_id, seq)
        if why is not None:
            return why
        with self._lock:
            models = dict(self.state.models)
            if model_id is not None:
                models[model_id] = max(models.get(model_id, 0), seq)
            bundles = {b: v for b, v in self.state.bundles.items() if b != manifest.bundle_id}
            bundles[manifest.bundle_id] = (model_id, seq)
            bundles = dict(list(bundles.items())[-MAX_REMEMBERED_BUNDLES:])
            self.state = self.state.model_copy(update={"models": models, "bundles": bundles})
            self._save()
        return None

    def stored_downgrade(self, bundle_id: str) -> str | None:
        """The downgrade check of a bundle already stored here (deployed again without a manifest)."""
        model_id, seq = self.state.bundles.get(bundle_id, (None, 0))
        return self.downgrade(bundle_id, model_id, seq)
