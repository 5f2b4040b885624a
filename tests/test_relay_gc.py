"""The relay times its process's garbage-collector pauses (issue 11: hostile input must not buy a
long pause later) and shows them in /metrics and /debug/stats."""

from __future__ import annotations

import gc

import httpx
import trio

from rescue.relay import GcPauses
from rescue.testing import start_test_relay


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_an_installed_monitor_times_every_collection_and_a_removed_one_none() -> None:
    pauses = GcPauses()
    pauses.install()
    pauses.install()  # idempotent: one callback
    try:
        for _ in range(100):
            _Cycle()
        gc.collect()
    finally:
        pauses.remove()
    assert pauses.by_generation[2].count == 1
    assert pauses.max_generation == 2
    assert 0 < pauses.max_pause < 5
    assert pauses.collected >= 100
    gc.collect()
    assert pauses.by_generation[2].count == 1  # removed: not timed
    pauses.reset()
    assert pauses.snapshot() == {
        "collections": [0, 0, 0],
        "pause_s_total": [0.0, 0.0, 0.0],
        "max_pause_s": 0.0,
        "max_pause_generation": -1,
        "collected": 0,
    }


async def test_a_running_relay_shows_its_pauses(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        relay, _url, _keys = await start_test_relay(nursery)
        gc.collect()
        stats = relay.statistics()["gc"]
        assert stats["collections"][2] >= 1
        assert stats["max_pause_s"] > 0
        text, _ = relay.metrics.render()
        assert b'beach_rescue_gc_pause_seconds_count{generation="2"}' in text
        assert b"beach_rescue_gc_pause_max_seconds " in text
        relay.shutdown()
        await relay.wait_stopped()
    assert relay.gc_pauses._callback not in gc.callbacks


def test_a_forced_full_collection_is_timed_apart_from_serving_pauses() -> None:
    pauses = GcPauses()
    pauses.install()
    try:
        garbage = [_Cycle() for _ in range(500)]
        del garbage
        result = pauses.full_collection()
    finally:
        pauses.remove()
    assert result["collected"] >= 500
    assert result["pause_s"] > 0
    assert result["tracked_after"] < result["tracked_before"]
    assert pauses.snapshot()["collections"] == [0, 0, 0]  # not a pause of serving


async def test_post_debug_gc_answers_a_timed_full_collection(nursery: trio.Nursery) -> None:
    with trio.fail_after(30):
        relay, _url, _keys = await start_test_relay(nursery, admin_port=0)
        assert relay.addresses is not None
        admin = f"http://127.0.0.1:{relay.addresses.admin_port}"
        async with httpx.AsyncClient() as http:
            answer = (await http.post(f"{admin}/debug/gc")).json()
            assert set(answer) == {"pause_s", "collected", "tracked_before", "tracked_after"}
            assert answer["tracked_after"] > 0
            assert (await http.get(f"{admin}/debug/gc")).status_code == 405  # it pauses: POST only
        relay.shutdown()
