"""Request ids and the batch sizes the feedback endpoint checks labels against."""

import tracemalloc

import pytest

from agent.recent_requests import RecentRequests


def test_the_last_n_requests_are_remembered_and_older_ones_are_not():
    recent = RecentRequests(remember=5)
    ids = [recent.add(batch) for batch in range(1, 9)]
    assert len(set(ids)) == 8
    assert [recent.batch_of(i) for i in ids] == [None, None, None, 4, 5, 6, 7, 8]


def test_ids_of_another_engine_or_process_and_malformed_ids_are_unknown():
    mine, other = RecentRequests(), RecentRequests()
    rid = mine.add(3)
    token, counter = rid.split("-")
    assert other.batch_of(rid) is None and other.add(1) != rid
    for bad in ("nope", "", "-", f"{token}-", f"{token}-zz", f"{token}-+0", f"{token}- 0", f"{token}--1",
                f"{token}-1", f"{token}-{counter}-0", f"x{token}-{counter}"):
        assert mine.batch_of(bad) is None, bad
    assert mine.batch_of(rid) == 3


def test_remembering_ten_thousand_requests_costs_kilobytes_not_megabytes():
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        recent = RecentRequests(remember=10_000)
        for _ in range(30_000):
            recent.add(1)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100_000, grown


def test_remembering_nothing_is_refused():
    with pytest.raises(ValueError, match="remember"):
        RecentRequests(remember=0)
