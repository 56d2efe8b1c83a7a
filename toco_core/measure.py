"""Measure a model on this box: p50 latency at batch 1 and session memory (in a child process).

Run as ``python -m toco_core.measure FILE`` it prints the RSS growth of creating a session
and running it once, in bytes: a clean process so nothing else is counted. The line before it
splits that growth into anonymous memory (the model's own: weights, packed copies, arena, heap
glibc keeps) and file-backed pages (onnxruntime's library code the first session and run page in,
about the same ~13-14 MB for every model on this box, and shared with every process that loaded it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toco_core.model_inputs import Batch, feed
from toco_core.runtime import input_dtype, make_session

if TYPE_CHECKING:  # the measuring child must not import onnx: with ml_dtypes, 0.9 of its 1.3 s
    import onnx


def p50_latency(model: onnx.ModelProto | bytes, x1: Batch, threads: int = 0, runs: int = 100,
                max_seconds: float = 0.25) -> float:
    """Median seconds of one batch-1 run after warm-up: ``runs`` timed runs, fewer (at least 20)
    when they would take longer than ``max_seconds`` (a median of 20 is stable to a few %)."""
    return interleaved_p50s([model], x1, threads, runs, max_seconds)[0]


def interleaved_p50s(models: list[onnx.ModelProto | bytes], x1: Batch, threads: int = 0, runs: int = 100,
                     max_seconds: float = 0.5) -> list[float]:
    """Median seconds of each model's batch-1 run, one run of each in turn per round after 5 warm-up
    rounds; ``runs`` rounds, fewer (at least 20) when they would take longer than ``max_seconds``.

    Alternating the runs exposes the models to the same moments of a shared machine's load, so their
    ratio holds where p50s taken one after the other drift apart (with back-to-back re-measures, every
    try of a 30 us LeNet-5 plan once failed as slower, 0.03 against 0.03 ms)."""
    sessions = [make_session(m, threads) for m in models]
    feeds = [feed(x1, [i.name for i in s.get_inputs()]) for s in sessions]
    t = time.perf_counter()
    for _ in range(5):
        for s, f in zip(sessions, feeds, strict=True):
            s.run(None, f)
    per_round = (time.perf_counter() - t) / 5
    runs = max(20, min(runs, int(max_seconds / max(per_round, 1e-9))))
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for k, (s, f) in enumerate(zip(sessions, feeds, strict=True)):
            t = time.perf_counter()
            s.run(None, f)
            times[k].append(time.perf_counter() - t)
    return [float(np.median(ts)) for ts in times]


@dataclass(frozen=True)
class SessionMemory:
    """Growth of a fresh process' memory from creating a session and running it once, bytes.

    ``rss``: resident set (what session_rss returns); ``anon``: its anonymous part (RssAnon: the
    model's weights, packed copies, arena and heap); ``file``: file-backed pages (RssFile: mostly
    onnxruntime's code, paged in by any model's first session and run). rss = anon + file (+ shmem).
    """

    rss: int
    anon: int | None  # None: the kernel does not split RSS (no RssAnon in /proc/self/status)
    file: int | None


def session_rss(model_bytes: bytes, input_shape: tuple[int, ...] | dict[str, tuple[int, ...]]) -> int | None:
    """RSS growth (bytes) of loading and running the model once in a fresh process; None on failure.

    ``input_shape``: the first input's shape, or the shape per input name (toco_core.model_inputs.shapes).
    """
    mem = session_memory(model_bytes, input_shape)
    return None if mem is None else mem.rss


def session_memory(model_bytes: bytes, input_shape: tuple[int, ...] | dict[str, tuple[int, ...]]
                   ) -> SessionMemory | None:
    """session_rss split into its anonymous and file-backed parts (SessionMemory); None on failure
    (the child could not load or run the model)."""
    return PendingMemory(model_bytes, input_shape).result()


class PendingMemory:
    """A session-memory measurement running in its child process while the caller goes on.

    Two children may run side by side: each counts only its own process' growth. Takes what
    session_memory takes; ``result()`` waits for the child (at most 120 s) and returns its
    SessionMemory, or None when the child failed or timed out; ``cancel()`` ends it unread.
    """

    def __init__(self, model_bytes: bytes, input_shape: tuple[int, ...] | dict[str, tuple[int, ...]]) -> None:
        shapes = input_shape if isinstance(input_shape, dict) else {"": input_shape}
        with tempfile.NamedTemporaryFile(suffix=".onnx", delete=False) as f:
            f.write(model_bytes)
        self._path = Path(f.name)
        self._proc = subprocess.Popen([sys.executable, "-m", "toco_core.measure", f.name,
                                       json.dumps({k: [int(d) for d in v] for k, v in shapes.items()})],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def result(self) -> SessionMemory | None:
        """The child's measurement; None when it failed, printed no measurement or took over 120 s.
        Read once: a second call (or one after cancel) returns None."""
        if self._proc.returncode is not None:
            return None
        try:
            out, _ = self._proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.cancel()
            return None
        finally:
            self._path.unlink(missing_ok=True)
        try:
            *_, split, rss = out.strip().splitlines()
            parts = json.loads(split)
            anon, file = parts["anon"], parts["file"]
            return SessionMemory(int(rss), None if anon is None else int(anon), None if file is None else int(file))
        except (ValueError, KeyError, TypeError):  # no output (the child failed), or a line that is not ours
            return None

    def cancel(self) -> None:
        """End the child without reading it (a candidate that failed another check); after result(),
        does nothing."""
        if self._proc.returncode is None:
            self._proc.kill()
            self._proc.communicate()
        self._path.unlink(missing_ok=True)


def _status_kib() -> dict[str, int]:
    # RssAnon / RssFile of this process, bytes (Linux >= 4.5); {} where the kernel has no such split
    try:
        with open("/proc/self/status") as fh:
            return {m[1]: int(m[2]) * 1024 for line in fh if (m := re.match(r"(RssAnon|RssFile):\s+(\d+)", line))}
    except OSError:
        return {}


def _child(path: str, shapes: str) -> None:
    import psutil

    proc = psutil.Process()
    data = Path(path).read_bytes()
    before, split_before = proc.memory_info().rss, _status_kib()
    sess = make_session(data, 1)
    wanted = json.loads(shapes)
    rng = np.random.default_rng(0)
    # every input in its own dtype: a uint8 camera model refuses float data (and the RSS would be lost)
    feeds = {inp.name: rng.integers(0, 2, wanted.get(inp.name, wanted.get("", []))).astype(input_dtype(inp))
             for inp in sess.get_inputs()}
    sess.run(None, feeds)
    after = _status_kib()
    grew = {k: after[k] - split_before[k] if k in after and k in split_before else None for k in ("RssAnon", "RssFile")}
    print(json.dumps({"anon": grew["RssAnon"], "file": grew["RssFile"]}))
    print(proc.memory_info().rss - before)  # last: the line session_rss reads


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
