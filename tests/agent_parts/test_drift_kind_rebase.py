"""Alert kinds on the box (toco_core.drift_kind) and rebasing the reference on field windows
(toco_core.drift_rebase), on the real LeNet-5 and real MNIST digits."""

from __future__ import annotations

import pytest

from tests.agent_parts.test_drift import SETTINGS, reference, stream  # noqa: F401  (fixture)
from toco_core.demo.data import shifted_digits
from toco_core.drift_monitor import DriftMonitor
from toco_core.errors import PoolError


def test_rotated_digits_are_data_drift_while_agreement_holds(lenet, digits, reference):  # noqa: F811
    x = shifted_digits(digits.x_heldout, "rotate")
    monitor = DriftMonitor(reference, SETTINGS.model_copy(update={"shadow_fraction": 1.0}), seed=2, now=0.0)
    # the base itself runs as the "compressed" model: agreement holds whatever the inputs are
    reports = [r.report for r in stream(monitor, lenet.base_session, lenet.base_session, x, digits.y_heldout,
                                        windows=SETTINGS.consecutive_windows)]
    assert reports[-1].alert and reports[-1].kind == "data"
    assert all(r.kind is None for r in reports[:-1])


def test_an_unshadowed_box_leaves_the_kind_to_the_server(lenet, digits, reference):  # noqa: F811
    x = shifted_digits(digits.x_heldout, "rotate")
    monitor = DriftMonitor(reference, SETTINGS.model_copy(update={"shadow_fraction": 0.0}), seed=2, now=0.0)
    reports = [r.report for r in stream(monitor, lenet.compressed_session, lenet.base_session, x, digits.y_heldout,
                                        windows=SETTINGS.consecutive_windows)]
    assert reports[-1].alert and reports[-1].kind is None


def test_rebase_puts_a_stable_new_distribution_in_band(lenet, digits, reference):  # noqa: F811
    # data drift alone: the base serves (agreement holds) and no labels come back (no accuracy check)
    x, serve, base = shifted_digits(digits.x_heldout, "invert"), lenet.base_session, lenet.base_session
    monitor = DriftMonitor(reference, SETTINGS, seed=3, now=0.0)
    with pytest.raises(PoolError, match="no closed field window"):
        monitor.rebase()
    before = stream(monitor, serve, base, x, digits.y_heldout, windows=4, seed=1, label_share=0)
    assert before[-1].report.alert and before[-1].report.kind == "data"
    new = monitor.rebase(windows=4)
    assert new.n_samples == 4 * SETTINGS.window_max_samples and not monitor.alerting
    after = stream(monitor, serve, base, x, digits.y_heldout, windows=20, seed=2, label_share=0)
    assert not any(r.report.alert for r in after)
    assert sum(bool(r.report.out_of_band) for r in after) <= 2
    # later windows are judged against the new reference: the old distribution is now the shifted one
    clean = stream(monitor, serve, base, digits.x_heldout, digits.y_heldout, windows=3, seed=4, label_share=0)
    assert clean[-1].report.alert and "input_shift" in clean[-1].report.out_of_band


def test_a_new_bundles_monitor_keeps_the_field_windows(lenet, digits, reference):  # noqa: F811
    monitor = DriftMonitor(reference, SETTINGS, seed=3, now=0.0)
    stream(monitor, lenet.compressed_session, lenet.base_session, digits.x_heldout, digits.y_heldout, windows=2)
    successor = DriftMonitor(reference, SETTINGS, field=monitor.field)
    assert len(successor.field) == 2 and successor.rebase(windows=2).n_samples == 2 * SETTINGS.window_max_samples
