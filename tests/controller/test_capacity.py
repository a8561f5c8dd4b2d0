"""Capacity hands out leases: a slot is freed once, by whoever holds it, and passes to waiters in order."""

from __future__ import annotations

import asyncio

import pytest

from browservm.controller.capacity import Capacity, Lease
from browservm.controller.errors import ApiError


async def test_a_lease_frees_its_slot_once_however_often_it_is_released() -> None:
    capacity = Capacity(limit=2, max_queued=0)
    first, second = capacity.try_take(), capacity.try_take()
    assert first is not None and second is not None
    assert capacity.try_take() is None  # full
    first.release()
    first.release()  # a second release of the same lease does not free the other one's slot
    third = capacity.try_take()
    assert third is not None and capacity.in_use == 2
    assert capacity.try_take() is None


async def test_a_released_slot_passes_to_waiters_in_arrival_order() -> None:
    capacity = Capacity(limit=1, max_queued=5)
    holder = await capacity.acquire()
    places: dict[str, list[int]] = {"a": [], "b": []}

    async def wait(key: str) -> Lease:
        async def moved(place: int) -> None:
            places[key].append(place)

        return await capacity.acquire(key=key, on_position=moved)

    a = asyncio.create_task(wait("a"))
    await asyncio.sleep(0)
    b = asyncio.create_task(wait("b"))
    await asyncio.sleep(0.01)
    assert capacity.queue() == ["a", "b"]
    holder.release()
    a_lease = await asyncio.wait_for(a, 1)
    assert not b.done() and capacity.queue() == ["b"]
    await asyncio.sleep(0.01)
    assert places == {"a": [1], "b": [2, 1]}
    assert capacity.in_use == 1  # the slot went straight to "a": never free in between
    assert not capacity.freed.is_set()
    a_lease.release()
    (await asyncio.wait_for(b, 1)).release()
    assert capacity.in_use == 0 and capacity.freed.is_set()


async def test_a_waiter_that_gives_up_leaves_the_line_and_loses_no_slot() -> None:
    capacity = Capacity(limit=1, max_queued=5)
    holder = await capacity.acquire()
    gives_up = asyncio.create_task(capacity.acquire(key="gone"))
    stays = asyncio.create_task(capacity.acquire(key="stays"))
    await asyncio.sleep(0.01)
    gives_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gives_up
    assert capacity.queue() == ["stays"]
    holder.release()
    (await asyncio.wait_for(stays, 1)).release()
    assert capacity.in_use == 0


async def test_a_slot_handed_over_as_its_waiter_gives_up_passes_on() -> None:
    capacity = Capacity(limit=1, max_queued=5)
    holder = await capacity.acquire()
    first = asyncio.create_task(capacity.acquire(key="first"))
    second = asyncio.create_task(capacity.acquire(key="second"))
    await asyncio.sleep(0.01)
    holder.release()  # resolves "first"'s slot...
    first.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await first
    (await asyncio.wait_for(second, 1)).release()
    assert capacity.in_use == 0


async def test_admissions_count_against_the_queue_and_are_withdrawn_once() -> None:
    capacity = Capacity(limit=1, max_queued=1)
    first, second = capacity.admit(), capacity.admit()
    with pytest.raises(ApiError) as refused:
        capacity.admit()
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "10"}
    second.withdraw()
    second.withdraw()  # once only: it does not make room for two
    third = capacity.admit()
    with pytest.raises(ApiError):
        capacity.admit()
    lease = await capacity.acquire(admission=first)  # a lease ends the admission
    assert capacity.admitted == 1
    third.withdraw()
    lease.release()
    assert (capacity.admitted, capacity.in_use) == (0, 0)


async def test_an_offered_lease_counts_as_available_and_a_cli_vm_can_reclaim_it() -> None:
    capacity = Capacity(limit=1, max_queued=0)
    warm = capacity.try_take()
    assert warm is not None
    warm.offer()
    capacity.admit().withdraw()  # an idle warm sandbox does not make the host look full to sessions

    async def reclaim() -> Lease | None:
        warm.claim()
        return warm

    capacity.reclaim = reclaim
    taken = await capacity.take_now()
    assert taken is warm and capacity.spare == 0 and capacity.in_use == 1
    capacity.reclaim = None
    with pytest.raises(ApiError) as refused:
        await capacity.take_now()
    assert refused.value.status == 429
    taken.release()
    assert capacity.in_use == 0


async def test_an_offered_lease_stops_counting_as_spare_when_released() -> None:
    capacity = Capacity(limit=2, max_queued=0)
    lease = capacity.try_take()
    assert lease is not None
    lease.offer()
    lease.offer()
    assert capacity.spare == 1
    lease.release()
    assert (capacity.spare, capacity.in_use) == (0, 0)


async def test_the_pool_never_takes_a_slot_someone_waits_for() -> None:
    capacity = Capacity(limit=1, max_queued=2)
    holder = await capacity.acquire()
    waiting = asyncio.create_task(capacity.acquire(key="session"))
    await asyncio.sleep(0.01)
    holder.release()
    assert capacity.try_take() is None  # the freed slot went to the waiting session
    (await asyncio.wait_for(waiting, 1)).release()
    assert capacity.try_take() is not None


async def test_a_lease_used_as_a_context_manager_is_released_on_failure() -> None:
    capacity = Capacity(limit=1, max_queued=0)
    with pytest.raises(RuntimeError):
        async with await capacity.take_now():
            raise RuntimeError("the sandbox did not start")
    assert capacity.in_use == 0
