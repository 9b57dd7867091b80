"""The write gate: a pause waits for writes in flight, and holds new writes back until it ends."""
from __future__ import annotations

import threading
import time

from kvstore.write_gate import WriteGate


def test_pause_waits_for_writes_in_flight_and_blocks_new_ones():
    gate = WriteGate()
    events: list[str] = []
    writing, release_writer = threading.Event(), threading.Event()
    paused, release_pause = threading.Event(), threading.Event()

    def first_writer():
        with gate.writing():
            writing.set()
            release_writer.wait(5)
            events.append("first write done")

    def pause():
        with gate.paused():
            events.append("paused")
            paused.set()
            release_pause.wait(5)
            events.append("resumed")

    def late_writer():
        with gate.writing():
            events.append("late write")

    threads = [threading.Thread(target=first_writer)]
    threads[0].start()
    writing.wait(5)
    threads.append(threading.Thread(target=pause))
    threads[1].start()
    time.sleep(0.05)
    assert not paused.is_set(), "the pause began under a write in flight"
    threads.append(threading.Thread(target=late_writer))
    threads[2].start()                        # arrives while the pause waits: must not overtake it
    time.sleep(0.05)
    release_writer.set()
    paused.wait(5)
    time.sleep(0.05)
    assert "late write" not in events, "a write entered a paused gate"
    release_pause.set()
    for t in threads:
        t.join(5)
    assert events == ["first write done", "paused", "resumed", "late write"]


def test_a_writer_that_will_not_wait_is_refused_during_a_pause_and_admitted_after():
    gate = WriteGate()
    with gate.writing(wait=False) as admitted:
        assert admitted
    with gate.paused():
        with gate.writing(wait=False) as admitted:
            assert not admitted                            # refused at once, not counted as a writer
    paused = threading.Event()

    def pause():
        with gate.paused():
            paused.set()

    pauser = threading.Thread(target=pause)
    with gate.writing(wait=False) as admitted:
        assert admitted
        pauser.start()                                     # waits for this write to end
    pauser.join(60)
    assert paused.is_set()
