"""Short, rare jobs the daemon runs in a child process, so their imports and garbage never stay in it.

The daemon lives for months on boxes with little memory; what it imports stays resident.
These jobs need heavy modules for a moment: the probe (onnx graphs, benchmark sessions),
the manifest and command signature checks and the public key (cryptography, about 8 MB resident:
docs/agent_memory.md), taking
the base model out of a stored bundle (toco_core.bundle imports cryptography). Each runs as
``python -m agent.child_tasks TASK ...`` and answers on stdout; a failure the child
understood comes back as the same typed error, anything else as a TocoError naming the task.
A child costs about 0.3-0.6 s; these jobs run at start, once per bundle and once per command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from toco_core.errors import BundleError, ConfigError, DeviceError, SignatureError, TocoError

if TYPE_CHECKING:  # the parent imports these lazily, where it needs them
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from toco_core.device import DeviceProfile
    from toco_core.messages import TrustedKey

_ERRORS: dict[str, type[TocoError]] = {"BundleError": BundleError, "ConfigError": ConfigError,
                                       "DeviceError": DeviceError, "SignatureError": SignatureError}
_EXPECTED = 3  # exit code of a child that reports a TocoError as JSON on stdout


def _run(task: str, args: list[str], stdin: bytes = b"", timeout: float = 120.0) -> bytes:
    """Run one task; returns its stdout. Raises the child's TocoError, or TocoError when it crashed."""
    try:
        out = subprocess.run([sys.executable, "-m", "agent.child_tasks", task, *args], input=stdin,
                             capture_output=True, timeout=timeout, cwd=os.getcwd())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TocoError(f"the {task} child process did not run: {exc}",
                        "check free memory and the agent's venv") from exc
    if out.returncode == _EXPECTED:
        err = json.loads(out.stdout)
        raise _ERRORS.get(err["type"], TocoError)(err["message"], err.get("hint"))
    if out.returncode != 0:
        tail = out.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        raise TocoError(f"the {task} child process failed: {tail[0][:300]}", "see the agent log; report it")
    return out.stdout


def check_public_key(path: Path) -> TrustedKey:
    """Load the provisioned Ed25519 public key in a child; returns it as a TrustedKey (fingerprint, hex).

    Raises ConfigError when the file is missing or not an Ed25519 key.
    """
    from toco_core.messages import TrustedKey

    try:
        return TrustedKey.model_validate_json(_run("key", [str(path)]))
    except BundleError as exc:
        raise ConfigError(f"public_key {path}: {exc.message}", exc.hint) from None


def verify_manifest_file(public_key: Path, manifest_json: bytes) -> None:
    """Check a manifest's Ed25519 signature (toco_core.bundle.verify_manifest) in a child.

    ``public_key`` is a PEM file, or the agent's trust.json (agent.trust_store): then the key the
    manifest names as its signer must be in the trusted set.
    Raises BundleError when it is unsigned or does not verify, TocoError when the check could not run.
    """
    _run("verify", [str(public_key)], stdin=manifest_json, timeout=60)


def verify_command(trust_file: Path, command_json: bytes) -> None:
    """Check a command's Ed25519 signature against the key set in ``trust_file`` (trust.json) in a child.

    Raises SignatureError when it is unsigned, its key is not trusted or it does not verify,
    TocoError when the check could not run.
    """
    _run("verify-command", [str(trust_file)], stdin=command_json, timeout=60)


def extract_file(bundle: Path, name: str, out: Path) -> None:
    """Write file ``name`` of a stored bundle to ``out`` (atomically). Raises BundleError when absent."""
    _run("extract", [str(bundle), name, str(out)])


def master_model(parts_dir: Path, names: list[str], out: Path) -> None:
    """Write the model a parts bundle's parts reach (the master when every bit plane is among
    ``names``) to ``out`` (atomically): the drift shadow of a box without the fp32 base.

    Raises BundleError when a part is missing or damaged.
    """
    _run("master", [str(parts_dir), str(out), *names])


def probe(state_dir: Path, benchmark: bool, device_id: str | None) -> DeviceProfile:
    """toco_core.probe.probe_device in a child; returns the DeviceProfile. Raises DeviceError."""
    from toco_core.device import DeviceProfile

    raw = _run("probe", [str(state_dir), "1" if benchmark else "0", device_id or ""])
    return DeviceProfile.model_validate_json(raw)


# ----------------------------------------------------------------------------- child side
def _trusted_keys(trust_file: str) -> dict[str, Ed25519PublicKey]:
    """``{fingerprint: Ed25519PublicKey}`` of the key set in the agent's trust.json (child side)."""
    from agent.trust_store import TrustState
    from toco_core.command_signing import public_keys

    return public_keys(TrustState.model_validate_json(Path(trust_file).read_bytes()).keys)


def _child(task: str, args: list[str]) -> bytes:
    if task == "key":
        from toco_core.bundle import key_fingerprint, load_public_key, public_key_raw

        if not Path(args[0]).is_file():
            raise ConfigError(f"public key file {args[0]} does not exist", "copy the fleet server's key there")
        key = load_public_key(args[0])
        return json.dumps({"fingerprint": key_fingerprint(key), "public_key": public_key_raw(key).hex()}).encode()
    if task == "verify":
        from toco_core.bundle import load_public_key, verify_manifest
        from toco_core.messages import MessageKind, parse_message

        manifest = parse_message(MessageKind.MANIFEST, sys.stdin.buffer.read())
        if args[0].endswith(".json"):
            trusted = _trusted_keys(args[0])
            if manifest.signature and manifest.signer not in trusted:
                raise BundleError(f"bundle {manifest.bundle_id[:12]} is signed by key {manifest.signer}, which this "
                                  f"device does not trust ({', '.join(sorted(trusted))})",
                                  "a retired or foreign key; re-provision the device if the server's key is new to it")
            key = (trusted.get(manifest.signer) if manifest.signer else None) or next(iter(trusted.values()))
        else:
            key = load_public_key(args[0])
        verify_manifest(manifest, key)
        return b"ok"
    if task == "verify-command":
        from toco_core.command_signing import verify_command
        from toco_core.messages import MessageKind, parse_message

        verify_command(parse_message(MessageKind.CMD, sys.stdin.buffer.read()), _trusted_keys(args[0]))
        return b"ok"
    if task == "extract":
        from toco_core.atomic_files import atomic_write
        from toco_core.bundle import unpack_bundle

        files = unpack_bundle(Path(args[0]).read_bytes())
        if args[1] not in files:
            raise BundleError(f"bundle {Path(args[0]).name} has no {args[1]}", "deploy a complete bundle")
        atomic_write(Path(args[2]), files[args[1]])
        return b"ok"
    if task == "master":
        from toco_core.atomic_files import atomic_write
        from toco_core.onnx_model import model_bytes
        from toco_core.parts_bundle import source_from_parts

        try:
            parts = {n: (Path(args[0]) / n).read_bytes() for n in args[2:]}
        except OSError as exc:
            raise BundleError(f"a bundle part is not readable: {exc}", "fetch the bundle's parts again") from None
        atomic_write(Path(args[1]), model_bytes(source_from_parts(parts)[0].reference))
        return b"ok"
    if task == "probe":
        from toco_core.probe import probe_device

        return probe_device(args[0], benchmark=args[1] == "1", device_id=args[2] or None).model_dump_json().encode()
    raise SystemExit(f"unknown task {task!r}")


if __name__ == "__main__":
    try:
        answer = _child(sys.argv[1], sys.argv[2:])
    except TocoError as exc:
        sys.stdout.write(json.dumps({"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}))
        sys.exit(_EXPECTED)
    sys.stdout.buffer.write(answer)
