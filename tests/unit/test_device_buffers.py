"""The lifetime rules of clients' GPU buffers on the server (device_buffers.py), without a GPU.

A buffer is never closed under a call that uses it: a detach waits for the call to end, and the
open-buffer limit closes only idle buffers. The buffers here record their close instead of
calling the CUDA driver (the GPU path itself: tests/gpu/test_cuda_ipc.py)."""
from __future__ import annotations

import asyncio

import pytest
from kvstore_server.device_buffers import DeviceBuffer, DeviceBuffers

from kvstore.errors import InvalidArgument


class RecordedBuffer(DeviceBuffer):
    def close(self) -> None:
        self.closes = getattr(self, "closes", 0) + 1
        self.closed.set()


def opened(buffers: DeviceBuffers, *names: str) -> list[RecordedBuffer]:
    out = []
    for name in names:
        buffer = RecordedBuffer(name, device=0, pointer=1 << 20, size=1 << 20)
        buffers._open[name] = buffer
        buffers._close_extra()
        out.append(buffer)
    return out


NAMES = [f"kvstore-{i:032x}" for i in range(4)]


def test_a_detach_waits_for_the_call_using_the_buffer():
    async def run():
        buffers = DeviceBuffers()
        buffer, = opened(buffers, NAMES[0])
        holding, call_may_end = asyncio.Event(), asyncio.Event()

        async def call():
            with buffers.using(NAMES[0], "weights"):
                holding.set()
                await call_may_end.wait()
                assert not getattr(buffer, "closes", 0)      # not closed under the call

        running = asyncio.create_task(call())
        await holding.wait()
        detach = asyncio.create_task(buffers.detach(NAMES[0]))
        await asyncio.sleep(0)                               # one turn of the loop (no clock): detach waits now
        assert buffer.closing and not detach.done() and not getattr(buffer, "closes", 0)
        with pytest.raises(InvalidArgument, match="^grads.device_buffer"):   # no new call gets it
            with buffers.using(NAMES[0], "grads"):
                pass
        call_may_end.set()
        await asyncio.gather(running, detach)
        assert buffer.closes == 1

    asyncio.run(run())


def test_the_open_limit_closes_idle_buffers_only_least_recently_used_first():
    async def run():
        buffers = DeviceBuffers(max_open=2)
        first, second = opened(buffers, NAMES[0], NAMES[1])
        with buffers.using(NAMES[0], "weights"):               # in use, and now the most recent
            third, = opened(buffers, NAMES[2])
            assert getattr(second, "closes", 0) == 1            # the idle, least recently used one
            fourth, = opened(buffers, NAMES[3])
            assert not getattr(first, "closes", 0)              # in use: kept, though over the limit
            assert getattr(third, "closes", 0) == 1
        assert len(buffers) == 2 and not getattr(fourth, "closes", 0)
        buffers.close()
        assert first.closes == fourth.closes == 1

    asyncio.run(run())


def test_a_call_naming_an_unknown_buffer_is_invalid_argument_naming_the_field():
    with pytest.raises(InvalidArgument, match="^weights.device_buffer: no GPU buffer"):
        with DeviceBuffers().using(NAMES[0], "weights"):
            pass


def test_a_cancelled_call_still_waits_for_its_store_work_before_it_ends():
    """`to_the_end`: the store thread may be writing into a client's GPU buffer; the call's end (which
    lets the buffer close) comes only after that work, even when the call is cancelled."""
    import threading

    from kvstore_server.same_host_service import to_the_end

    async def run():
        release, finished = threading.Event(), threading.Event()

        def store_work():
            release.wait()
            finished.set()
            return "rows written"

        call = asyncio.create_task(to_the_end(asyncio.get_running_loop().run_in_executor(None, store_work)))
        await asyncio.sleep(0)                     # one turn of the loop (no clock): the call awaits its work
        call.cancel()
        await asyncio.sleep(0)
        assert not call.done()                     # cancelled, yet waiting for the thread
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert finished.is_set()

    asyncio.run(run())
