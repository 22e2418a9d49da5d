"""The generator's door: slots measured, the wait for one reported, and late requests shed at once."""

import asyncio

import pytest

from fabric.errors import Overloaded
from generator.backends.base import SLOT_WAIT, Slots


async def test_the_wait_for_a_slot_is_reported_and_kept_out_of_the_service_time():
    slots = Slots(1, queue_timeout_s=5)

    async def generation(hold_s: float) -> float:
        async with slots.hold():
            await asyncio.sleep(hold_s)
        return SLOT_WAIT.get()

    first, second = await asyncio.gather(asyncio.ensure_future(generation(0.2)), asyncio.ensure_future(generation(0.2)))
    assert first < 0.05 and 0.15 < second < 0.5, "the second waited for the first"
    assert slots.service_s == pytest.approx(0.2, abs=0.1), "holding time only, not the wait"


async def test_a_request_that_would_finish_after_its_deadline_is_refused_at_once():
    slots = Slots(2, queue_timeout_s=5)
    slots.record(1.0)
    slots.check(1.5)  # a free slot: one service
    taken = [await slots.take() for _ in range(2)]
    assert slots.expected_s() == pytest.approx(2.0)  # waits for one of the two to end
    with pytest.raises(Overloaded) as info:
        slots.check(1.5)
    assert "2 running" in info.value.message and info.value.retry_after_s == pytest.approx(0.5)
    for t in taken:
        slots.give(t)
    with pytest.raises(Overloaded, match="stayed busy"):
        slots.queue_timeout_s = 0.05
        held = [await slots.take() for _ in range(2)]
        try:
            await slots.take()
        finally:
            for t in held:
                slots.give(t)
