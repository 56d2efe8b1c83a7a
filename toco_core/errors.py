"""Every error TOCO raises on purpose, with a message meant for people.

Hierarchy::

    TocoError                    base; ``str(err)`` is one line: what is wrong + what to do
    ├── ModelError               the ONNX file is unreadable, invalid or has no compressible weights
    │   └── UnsupportedOpError   the graph uses an op the differentiable evaluator does not know
    ├── PoolError                a sample pool is missing, empty or does not fit the model input
    ├── AnalysisError            an analysis result directory is missing, corrupt or inconsistent
    ├── ConfigError              a configuration value or command-line option is invalid
    ├── UnregisteredNameError    a runtime form or curve operator name no registry holds
    ├── DeviceError              a device profile cannot be probed or loaded
    ├── InfeasibleError          no compression plan meets the device limits within the fidelity budget
    ├── SelfTestError            a compressed model failed the self-test gate
    ├── BundleError              a bundle is malformed, corrupt, unsigned or badly signed
    ├── TransferError            a bundle transfer failed (missing chunks, bad hash, no space)
    └── DatabaseError            the fleet database's schema is unknown to this release or cannot be adopted

The CLI prints ``str(err)`` on one line and exits with ``err.exit_code``.
"""

from __future__ import annotations

from typing import Any


class TocoError(Exception):
    """Base class: ``message`` says what is wrong, ``hint`` what to do about it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ModelError(TocoError):
    """Raised when an ONNX model cannot be read, checked or used."""


class UnsupportedOpError(ModelError):
    """Raised when a graph holds an op the evaluator cannot differentiate."""

    def __init__(self, op_type: str, node_name: str, model_name: str) -> None:
        super().__init__(
            f"unsupported op {op_type!r} (node {node_name!r}) in model {model_name!r}",
            "TOCO analysis covers the ops listed in docs/ops.md; export the model without it "
            "or open an issue with the model",
        )
        self.op_type = op_type
        self.node_name = node_name
        self.model_name = model_name


class PoolError(TocoError):
    """Raised when a sample pool is missing, empty or shaped wrong for the model."""


class AnalysisError(TocoError):
    """Raised when an analysis result directory is missing, corrupt or inconsistent."""


class ConfigError(TocoError):
    """Raised when a configuration value or command-line option is invalid."""


class UnregisteredNameError(TocoError):
    """Raised when a runtime form or curve operator name is in no registry of this release.

    ``kind`` says which registry (``"runtime form"``, ``"curve operator"``), ``name`` the name
    asked for and ``known`` the registered ones.
    """

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}", "known: " + ", ".join(known))
        self.kind = kind
        self.name = name
        self.known = known


class DeviceError(TocoError):
    """Raised when a device profile cannot be probed or loaded."""


class InfeasibleError(TocoError):
    """Raised when no plan within the fidelity budget meets the device limits.

    ``needed`` and ``best`` carry the numbers for the message and for reports.
    """

    exit_code = 3

    def __init__(self, message: str, needed: dict[str, Any] | None = None, best: dict[str, Any] | None = None) -> None:
        super().__init__(message, "relax the limits or the fidelity budget")
        self.needed = needed or {}
        self.best = best or {}


class SelfTestError(TocoError):
    """Raised when a compressed model fails the self-test gate after all retries."""

    exit_code = 4


class BundleError(TocoError):
    """Raised when a bundle is malformed, corrupt, unsigned or badly signed."""


class SignatureError(TocoError):
    """Raised when a server command is unsigned, signed by a key not trusted, or its signature does not verify."""


class TransferError(TocoError):
    """Raised when a bundle transfer cannot complete."""


class DatabaseError(TocoError):
    """Raised when the fleet database cannot be opened at this release's schema.

    A newer release's revision, or tables this release cannot place in its migration history;
    nothing is changed in either case.
    """
