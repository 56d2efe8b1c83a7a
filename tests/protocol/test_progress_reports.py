"""The cadence of a box's `downloading` statuses (toco_core.progress_reports)."""

from toco_core.progress_reports import KEEPALIVE_S, MIN_GAP_S, ProgressReports


def _sent(shares_at: list[tuple[float, float]]) -> list[float]:
    reports = ProgressReports(0.0)
    return [share for t, share in shares_at if reports.due(share, t)]


def test_a_fast_fetch_sends_no_progress_status_between_its_start_and_end():
    # 100 frames in 5 s: under MIN_GAP_S, and the full share is the next phase's to report
    assert _sent([(i * 0.05, i / 100) for i in range(1, 101)]) == []


def test_a_steady_fetch_reports_each_quarter_at_most_every_min_gap():
    # 120 s for the whole fetch, a frame a second: quarters at 30, 60, 90 s (also the keep-alive's period)
    sent = _sent([(float(t), t / 120) for t in range(1, 121)])
    assert sent == [0.25, 0.5, 0.75]
    # a 40 s fetch: quarters at 10, 20, 30 s, each MIN_GAP_S after the last
    assert _sent([(float(t), t / 40) for t in range(1, 41)]) == [0.25, 0.5, 0.75]


def test_a_slow_fetch_still_reports_within_the_keepalive_so_the_deployment_does_not_time_out():
    # 1 % a minute would send nothing by share alone; the keep-alive makes it one status per KEEPALIVE_S at most
    times = [float(t) for t in range(1, 301)]
    reports = ProgressReports(0.0)
    sent_at = [t for t in times if reports.due(t / 6000, t)]
    assert sent_at == [KEEPALIVE_S * k for k in range(1, len(sent_at) + 1)] and len(sent_at) == 300 // KEEPALIVE_S
    assert all(b - a >= MIN_GAP_S for a, b in zip(sent_at, sent_at[1:], strict=False))


def test_no_progress_no_status_and_never_a_full_share():
    reports = ProgressReports(0.0)
    assert not reports.due(0.0, 100.0)  # nothing arrived: the silence is the server's to judge
    assert not reports.due(1.0, 100.0)
    assert reports.due(0.3, 100.0) and not reports.due(0.3, 200.0)
