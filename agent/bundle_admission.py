"""Whether a received bundle manifest may be downloaded: a valid signature, and room for the bundle here.

Checked once per manifest, before any chunk is requested (agent.bundle_download); a refusal
names its FailureReason and a sentence for the fleet server.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from agent.child_tasks import verify_manifest_file
from toco_core.errors import BundleError, TocoError
from toco_core.messages import BundleManifest, FailureReason
from toco_core.transfer import fits

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def verify_signature(manifest: BundleManifest, public_key: Ed25519PublicKey | Path) -> None:
    """Check ``manifest``'s Ed25519 signature against ``public_key``.

    A path (a PEM file, or the agent's trust.json: then the manifest's signer must be in the trusted
    key set) is checked in a child process (agent.child_tasks), so cryptography never loads into the
    daemon; a key object is used in this process. Raises BundleError for an
    unsigned or badly signed manifest, TocoError when the check itself could not run.
    """
    if isinstance(public_key, (str, Path)):
        if not manifest.signature:  # no child needed to see that
            raise BundleError(f"bundle {manifest.bundle_id[:12]} is unsigned",
                              "only deploy bundles signed by the fleet server")
        verify_manifest_file(Path(public_key), manifest.model_dump_json().encode())
    else:
        from toco_core.bundle import verify_manifest

        verify_manifest(manifest, public_key)


def free_space(folder: Path, disk_budget: int | None, mem_budget: int | None) -> tuple[int, int]:
    """(free bytes on ``folder``'s file system, available memory), each capped by its budget when not None."""
    disk = shutil.disk_usage(folder).free
    mem = psutil.virtual_memory().available
    return (min(disk, disk_budget) if disk_budget is not None else disk,
            min(mem, mem_budget) if mem_budget is not None else mem)


def refusal(manifest: BundleManifest, public_key: Ed25519PublicKey | Path, folder: Path, disk_budget: int | None,
            mem_budget: int | None) -> tuple[FailureReason, str] | None:
    """Why ``manifest`` must not be downloaded into ``folder``, as (reason, detail), or None when it may.

    Raises OSError when the free space cannot be read.
    """
    try:
        verify_signature(manifest, public_key)
    except BundleError as exc:
        return (FailureReason.UNSIGNED if not manifest.signature else FailureReason.BAD_SIGNATURE), str(exc)
    except TocoError as exc:  # the check itself could not run: refuse, never accept unchecked
        return FailureReason.BAD_SIGNATURE, f"signature not checked: {exc}"
    free_disk, free_mem = free_space(folder, disk_budget, mem_budget)
    space = fits(manifest, free_disk, free_mem)
    if not space.ok:
        return space.reason, space.detail  # type: ignore[return-value]
    return None
