"""Per-step delivery of stream chunks: one hand-over per event loop per core message, and
chunks a slow consumer has not read yet merged into one."""

from __future__ import annotations

import asyncio
import queue
import threading

from radixlm.engine.frontend import _DONE as DONE
from radixlm.engine.frontend import DeliveryBatch, is_done, merge_chunks, take_coalesced


class CountingLoop:
    """Stands in for an event loop: records each thread-safe call and runs it at once."""

    def __init__(self):
        self.calls = 0

    def call_soon_threadsafe(self, fn, arg):
        self.calls += 1
        fn(arg)


def chunk(text: str, delta: str, ids: list[int]) -> dict:
    return {"text": text, "delta": delta, "output_ids": ids, "meta_info": {"n": len(ids)}}


def test_a_step_for_many_requests_is_one_call_per_loop_in_order():
    loop_a, loop_b = CountingLoop(), CountingLoop()
    queues = [asyncio.Queue() for _ in range(5)]
    batch = DeliveryBatch()
    for i, q in enumerate(queues):
        batch.add(loop_a if i < 4 else loop_b, q, f"item-{i}")
    batch.add(loop_a, queues[0], "second")
    assert loop_a.calls == loop_b.calls == 0  # nothing reaches a loop before the flush
    batch.flush()
    assert (loop_a.calls, loop_b.calls) == (1, 1)
    assert [queues[0].get_nowait(), queues[0].get_nowait()] == ["item-0", "second"]
    assert [q.get_nowait() for q in queues[1:]] == [f"item-{i}" for i in range(1, 5)]
    batch.flush()  # emptied by the first flush
    assert (loop_a.calls, loop_b.calls) == (1, 1)


def test_a_closed_loop_is_skipped_without_raising():
    loop = asyncio.new_event_loop()
    loop.close()
    batch = DeliveryBatch()
    batch.add(loop, asyncio.Queue(), "x")
    batch.flush()


def test_merged_chunk_is_the_newer_snapshot_with_both_deltas():
    merged = merge_chunks(chunk("He", "He", [1]), chunk("Hello", "llo", [1, 2]))
    assert merged == chunk("Hello", "Hello", [1, 2])


def test_take_coalesced_merges_queued_chunks_and_holds_the_end_marker():
    events = queue.SimpleQueue()
    for item in (chunk("ab", "b", [1, 2]), chunk("abc", "c", [1, 2, 3]), DONE):
        events.put(item)
    item, held = take_coalesced(chunk("a", "a", [1]), events)
    assert item == chunk("abc", "abc", [1, 2, 3]) and is_done(held) and events.empty()
    # Nothing queued: the item passes through; an error is never merged.
    assert take_coalesced(chunk("x", "x", [7]), events) == (chunk("x", "x", [7]), None)
    err = RuntimeError("boom")
    events.put(chunk("y", "y", [8]))
    assert take_coalesced(err, events) == (err, None) and not events.empty()


def test_chunks_from_another_thread_reach_an_asyncio_consumer_in_order():
    async def main():
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def producer():
            text = ""
            for step in range(20):
                batch = DeliveryBatch()
                text += str(step % 10)
                batch.add(loop, events, chunk(text, str(step % 10), list(range(step + 1))))
                if step == 19:
                    batch.add(loop, events, DONE)
                batch.flush()

        thread = threading.Thread(target=producer)
        thread.start()
        received, held = "", None
        while True:
            item = held if held is not None else await events.get()
            held = None
            if is_done(item):
                break
            item, held = take_coalesced(item, events)
            received += item["delta"]
            last = item
        thread.join()
        return received, last

    received, last = asyncio.run(main())
    assert received == last["text"] == "01234567890123456789"
    assert last["output_ids"] == list(range(20))
