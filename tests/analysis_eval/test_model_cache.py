"""Trained demo models are made once however many processes ask at the same moment (test workers, benches
starting together on a fresh machine): the others wait for the first one's file instead of training their own
and renaming it over the file a reader already has."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

from toco_core.demo.train import made_once


def slow_make(path: Path) -> None:
    """Stands in for training: takes a while, appends to a log, writes the file through a temporary name."""
    with open(path.parent / "makes.log", "a") as log:
        log.write(f"{mp.current_process().pid}\n")
    time.sleep(0.5)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"made by {mp.current_process().pid}")
    tmp.replace(path)


def ask(path: str, out) -> None:
    made = made_once(Path(path), slow_make)
    out.put(made.read_text())


def test_four_processes_asking_at_once_get_one_model_made_once(tmp_path):
    path = tmp_path / "models" / "lenet5-trained.onnx"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=ask, args=(str(path), out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    contents = {out.get(timeout=5) for _ in procs}
    assert len((tmp_path / "models" / "makes.log").read_text().split()) == 1, "trained more than once"
    assert contents == {path.read_text()}, "every process read the one file"


def test_a_model_already_made_is_not_made_again(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_text("cached")
    assert made_once(path, lambda p: (_ for _ in ()).throw(AssertionError("made again"))) == path
    assert path.read_text() == "cached"
