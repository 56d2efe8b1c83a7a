import numpy as np
import pytest

from toco_core.demo.data import mnist_splits
from toco_core.demo.train import demo_model
from toco_core.onnx_model import load_model


@pytest.fixture(scope="session")
def digits():
    return mnist_splits()


@pytest.fixture(scope="session")
def lenet5_path():
    return demo_model("lenet5")


@pytest.fixture(scope="session")
def lenet5(lenet5_path):
    return load_model(lenet5_path)


@pytest.fixture(scope="session")
def lenet5_analysis(lenet5, digits):
    """A real (shortened) analysis of the demo CNN on the MNIST pool, with labels."""
    from toco_core.analysis.pipeline import analyze
    from toco_core.analysis.settings import AnalysisSettings

    settings = AnalysisSettings(max_rounds=3, samples_per_round=48, initial_samples=48)
    return analyze(lenet5, digits.x_pool, digits.y_pool, settings, model_name="lenet5")


@pytest.fixture(scope="session")
def pool_file(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("pool") / "pool.npz"
    np.savez(path, x=digits.x_pool[:300], y=digits.y_pool[:300])
    return path


@pytest.fixture(scope="session")
def mlp():
    return load_model(demo_model("mlp"))


@pytest.fixture(scope="session")
def mlp_analysis(mlp, digits):
    from toco_core.analysis.pipeline import analyze
    from toco_core.analysis.settings import AnalysisSettings

    settings = AnalysisSettings(max_rounds=2, samples_per_round=48, initial_samples=48)
    return analyze(mlp, digits.x_pool, digits.y_pool, settings, model_name="mlp")


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium, one for the session (tests/support/browser.py says why one)."""
    from tests.support.browser import chromium

    try:
        with chromium() as b:
            yield b
    except RuntimeError as exc:
        pytest.fail(str(exc))
