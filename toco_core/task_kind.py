"""Task kinds: what "the compressed model still does the base model's job" means per kind of output.

Every fidelity figure of TOCO - the calibration curves, the solver's budget, the self-test, the
drift monitor's shadow check, the QBC committee - is a *disagreement*: the share of samples on
which the compressed model's answer is not acceptable against the base model's answer. What
"acceptable" means depends on the task:

- ``classifier``: the same top-1 class (share of output positions whose top-1 changed);
  the continuous companion is KL(p_base || p_model).
- ``regression`` and ``score``: relative error e_i = ||y'_i - y_i||_2 / sigma, where sigma is
  the spread of the base output on the analysis pool, sigma^2 = mean_i ||y_i - mean(y)||^2.
  A sample disagrees when e_i > tolerance (default 0.1: a tenth of the output's spread). A
  ``score`` with a decision ``threshold`` also disagrees when the decision flips
  ((y'_i > t) != (y_i > t) for any of its values). Companion: e_i^2 / 2, the KL between
  N(y, sigma^2 I) and N(y', sigma^2 I).
- ``embedding``: cosine similarity c_i = <y_i, y'_i> / (||y_i|| ||y'_i||); a sample disagrees
  when c_i < 1 - tolerance (default 0.02: cosine floor 0.98). Companion: 1 - c_i, which is
  ||u'_i - u_i||^2 / 2 for the unit vectors u = y / ||y||.

Keeping every kind a share of samples keeps ``--budget`` one meaning - the largest share of
samples allowed to disagree - and keeps the binomial error bars of the solver, the self-test
gate and the drift bands valid as they are. The companions keep the meaning of a KL in nats,
so the curves' and solver's KL noise floor applies to them too.

Fisher weighting (toco_core.analysis.fisher): a classifier uses the Fisher of its categorical
output; the other kinds the Fisher of a Gaussian on a transformed output z,
F_i = mean_x sum_k (d z_k / d w_i)^2, with z = y / sigma (regression, score) or z = y / ||y||
(embedding, unit variance): half its quadratic form is the companion divergence above.

Pure numpy: the agent judges self-tests and drift with these functions.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from toco_core.errors import ConfigError, PoolError
from toco_core.fidelity import (
    Fidelity,
    OutputKind,
    as_log_probs,
    compare_outputs,
    per_sample_disagreement,
    per_sample_kl,
)


class TaskKind(str, Enum):
    """The kind of job a model's scored output does; the value is the stored and command-line name."""

    CLASSIFIER = "classifier"
    REGRESSION = "regression"
    SCORE = "score"
    EMBEDDING = "embedding"


GAUSSIAN_KINDS = (TaskKind.REGRESSION, TaskKind.SCORE, TaskKind.EMBEDDING)
# the per-sample error above which a sample counts as disagreeing, when none is given
DEFAULT_TOLERANCE = {TaskKind.REGRESSION: 0.1, TaskKind.SCORE: 0.1, TaskKind.EMBEDDING: 0.02}


class TaskSpec(BaseModel):
    """The task kind of an analysis with the numbers its metric needs; stored in the analysis
    manifest and the drift reference so the box judges with the server's metric.

    A missing spec (analyses and references made before task kinds) means a classifier.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: TaskKind = TaskKind.CLASSIFIER
    scale: float = Field(1.0, gt=0, description="sigma: spread of the base output on the pool (regression, score)")
    tolerance: float = Field(0.0, ge=0, description="per-sample error above which a sample disagrees")
    threshold: float | None = Field(None, description="score: decision threshold in output units")


CLASSIFIER = TaskSpec()


def parse_task_kind(name: str) -> TaskKind:
    """The TaskKind named ``name`` (case-insensitive). Raises ConfigError naming the known ones."""
    try:
        return TaskKind(name.strip().lower())
    except ValueError:
        known = ", ".join(k.value for k in TaskKind)
        raise ConfigError(f"unknown task kind {name!r}", f"use one of {known}") from None


def output_width(out: np.ndarray) -> int:
    """Values per sample of an output ``[N, ...]`` (1 for ``[N]``)."""
    return int(np.prod(np.shape(out)[1:], dtype=np.int64)) if np.ndim(out) > 1 else 1


def detect_task_kind(producer_op: str | None, width: int, threshold: float | None = None) -> TaskKind:
    """The task kind of a scored output when none is given.

    Takes the op type that produces the scored tensor (None for a graph input or unknown), the
    output's values per sample and the decision threshold if one was given. Returns
    ``classifier`` for a Softmax / LogSoftmax output; ``embedding`` for an LpNormalization
    output; for a 1-wide output ``score`` when a threshold is given, else ``regression``; otherwise
    ``classifier`` (a wider float output is taken for logits, as before task kinds).
    """
    if producer_op in ("Softmax", "LogSoftmax"):
        return TaskKind.CLASSIFIER
    if producer_op == "LpNormalization":
        return TaskKind.EMBEDDING
    if width == 1:
        return TaskKind.SCORE if threshold is not None else TaskKind.REGRESSION
    return TaskKind.CLASSIFIER


def check_task_kind(kind: TaskKind, width: int, threshold: float | None = None) -> None:
    """Refuse a task kind the output cannot have. Raises ConfigError with what to do.

    A classifier needs at least two classes per position and an embedding at least two values
    (the cosine of two scalars is +-1); a threshold only means something for a score.
    """
    if kind is TaskKind.CLASSIFIER and width < 2:
        raise ConfigError(f"--task classifier needs an output with at least 2 classes; the scored output has "
                          f"{width} value per sample", "use --task regression or --task score")
    if kind is TaskKind.EMBEDDING and width < 2:
        raise ConfigError(f"--task embedding needs an output vector; the scored output has {width} value per sample",
                          "use --task regression or --task score")
    if threshold is not None and kind is not TaskKind.SCORE:
        raise ConfigError(f"--threshold applies to --task score, not {kind.value}",
                          "drop --threshold or use --task score")


def output_spread(out: np.ndarray) -> float:
    """sigma = sqrt(mean_i ||y_i - mean(y)||^2): the spread of an output ``[N, ...]`` over its samples.

    Raises PoolError when the output does not vary (no relative error can be measured against it).
    """
    y = np.asarray(out, dtype=np.float64).reshape(len(out), -1)
    sigma = float(np.sqrt(((y - y.mean(0)) ** 2).sum(1).mean())) if len(y) else 0.0
    if not np.isfinite(sigma) or sigma <= 1e-12 * max(1.0, float(np.abs(y).max(initial=0.0))):
        raise PoolError("the scored output does not vary over the pool, so its relative error has no scale",
                        "give a pool of varied inputs, or analyse the model as another task kind")
    return sigma


def task_spec(kind: TaskKind, base_out: np.ndarray, tolerance: float | None = None,
              threshold: float | None = None) -> TaskSpec:
    """The spec of ``kind`` for a model whose base output on the pool is ``base_out``.

    Takes the kind, the base output (regression and score take their scale sigma from it,
    output_spread), the tolerance (None: DEFAULT_TOLERANCE) and a score's threshold. Raises
    ConfigError for a kind the output cannot have (check_task_kind), PoolError for a constant
    regression or score output.
    """
    check_task_kind(kind, output_width(base_out), threshold)
    if kind is TaskKind.CLASSIFIER:
        return CLASSIFIER
    tol = DEFAULT_TOLERANCE[kind] if tolerance is None else float(tolerance)
    if tol <= 0 or (kind is TaskKind.EMBEDDING and tol >= 2):
        raise ConfigError(f"--tolerance {tol} is out of range for {kind.value}",
                          "give a relative error > 0 (regression, score) or 1 - cosine floor in (0, 2) (embedding)")
    scale = output_spread(base_out) if kind in (TaskKind.REGRESSION, TaskKind.SCORE) else 1.0
    return TaskSpec(kind=kind, scale=scale, tolerance=tol, threshold=threshold)


def prepare(task: TaskSpec, out: np.ndarray, output_kind: OutputKind = "logits") -> np.ndarray:
    """A model output in the form the task's metric compares.

    classifier: log-probabilities ``[N, P, C]`` (toco_core.fidelity.as_log_probs); regression and
    score: y / sigma flattened to ``[N, D]``; embedding: unit vectors y / ||y|| ``[N, D]`` (a zero
    vector stays zero).
    """
    if task.kind is TaskKind.CLASSIFIER:
        return as_log_probs(out, output_kind)
    y = np.asarray(out, dtype=np.float64).reshape(len(out), -1)
    if task.kind is TaskKind.EMBEDDING:
        norm = np.linalg.norm(y, axis=1, keepdims=True)
        result: np.ndarray = y / np.maximum(norm, 1e-12)
        return result
    return y / task.scale


def sample_disagreement(task: TaskSpec, base: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Per-sample disagreement ``[N]`` in [0, 1] of prepared outputs (prepare).

    classifier: share of positions whose top-1 differs; regression/score: 1 where
    ||z' - z||_2 > tolerance (z = y / sigma), or where a score's decision z > t / sigma flips;
    embedding: 1 where cos(u, u') = <u, u'> < 1 - tolerance.
    """
    if task.kind is TaskKind.CLASSIFIER:
        return per_sample_disagreement(base, cand)
    if task.kind is TaskKind.EMBEDDING:
        below: np.ndarray = ((base * cand).sum(1) < 1.0 - task.tolerance).astype(np.float64)
        return below
    bad = np.linalg.norm(cand - base, axis=1) > task.tolerance
    if task.threshold is not None:
        t = task.threshold / task.scale
        bad |= ((base > t) != (cand > t)).any(axis=1)
    result: np.ndarray = bad.astype(np.float64)
    return result


def sample_divergence(task: TaskSpec, base: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Per-sample continuous companion ``[N]`` of prepared outputs (nats, >= 0).

    classifier: KL(p_base || p_cand) averaged over positions; regression/score:
    ||z' - z||^2 / 2; embedding: 1 - cos(u, u') = ||u' - u||^2 / 2.
    """
    if task.kind is TaskKind.CLASSIFIER:
        return per_sample_kl(base, cand)
    if task.kind is TaskKind.EMBEDDING:
        result: np.ndarray = np.maximum(1.0 - (base * cand).sum(1), 0.0)
        return result
    result = 0.5 * ((cand - base) ** 2).sum(1)
    return result


def disagreement(task: TaskSpec, base_out: np.ndarray, new_out: np.ndarray,
                 output_kind: OutputKind = "logits") -> float:
    """Share of samples on which ``new_out`` disagrees with ``base_out`` (raw model outputs, same shape)."""
    base, new = prepare(task, base_out, output_kind), prepare(task, new_out, output_kind)
    return float(sample_disagreement(task, base, new).mean())


def compare(task: TaskSpec, base_out: np.ndarray, new_out: np.ndarray, labels: np.ndarray | None = None,
            output_kind: OutputKind = "logits") -> Fidelity:
    """Fidelity of ``new_out`` against ``base_out`` in the task's metric.

    A classifier is measured by toco_core.fidelity.compare_outputs as ever (labels add accuracy);
    other kinds give agreement = 1 - mean sample_disagreement and, in the ``kl`` field, the mean
    sample_divergence; labels are not used (no accuracy). Raises ValueError when the shapes differ.
    """
    if task.kind is TaskKind.CLASSIFIER:
        return compare_outputs(base_out, new_out, labels, output_kind)
    if np.shape(base_out) != np.shape(new_out):
        raise ValueError(f"output shapes differ: base {np.shape(base_out)} vs candidate {np.shape(new_out)}")
    b, c = prepare(task, base_out), prepare(task, new_out)
    return Fidelity(n=int(len(base_out)), agreement=float(1.0 - sample_disagreement(task, b, c).mean()),
                    kl=float(max(sample_divergence(task, b, c).mean(), 0.0)))


def committee_variance(base: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Committee variance per sample: sum_k Var_m z_{m,k}, over the members and the base.

    Takes prepared outputs: base ``[N, D]`` and members ``[M, N, D]``; returns ``[N]`` (units of
    sigma^2 for regression and score, squared chord length for embeddings).
    """
    every = np.concatenate([base[None], members])
    result: np.ndarray = every.var(axis=0).sum(-1)
    return result


def committee_score(task: TaskSpec, base: np.ndarray, members: np.ndarray) -> np.ndarray:
    """QBC score per sample ``[N]``: how much a committee of tolerable models disputes it.

    classifier: vote entropy (base included) + mean KL to the base (toco_core.qbc); other
    kinds: committee_variance, plus for a thresholded score the share of members whose decision
    differs from the base's (a flip near the threshold matters more than a far-away spread).
    """
    if task.kind is TaskKind.CLASSIFIER:
        from toco_core.qbc import disagreement_score  # qbc imports onnxruntime; the agent never needs it here

        return disagreement_score(base, members)
    score = committee_variance(base, members)
    if task.threshold is not None:
        t = task.threshold / task.scale
        score = score + ((members > t) != (base > t)[None]).any(-1).mean(0)
    return score


def committee_disagreement(task: TaskSpec, base: np.ndarray, members: np.ndarray) -> float:
    """Mean over the members of their disagreement with the base (prepared outputs)."""
    return float(np.mean([sample_disagreement(task, base, m).mean() for m in members]))
