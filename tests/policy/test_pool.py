"""The resource pool: its size bound, waiting, checks, idle timeout and closing.

Tasks are ordered with events and by letting the loop run until a condition
is true (`until`), never by sleeping. The one real wait is the acquire
timeout of 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast

import pytest

from batchtools._exceptions import ConfigurationError, PoolTimeoutError
from batchtools.policy.pool import PoolStatistics, ResourcePool
from batchtools.testing import FakeClock


class Connection:
    """A resource that records how often it was closed."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.usable = True
        self.closes = 0

    def __repr__(self) -> str:
        return f"<Connection {self.number}>"

    async def aclose(self) -> None:
        self.closes += 1


class Factory:
    """A factory of numbered connections that can wait at a gate or fail calls.

    Attributes:
        calls: How many times the pool called it.
        made: The connections it returned, in order.
        gate: When set to an event, each call waits for it first.
        fail_on: Errors to raise, keyed by call number (1 is the first call).
    """

    def __init__(self) -> None:
        self.calls = 0
        self.made: list[Connection] = []
        self.gate: asyncio.Event | None = None
        self.fail_on: dict[int, BaseException] = {}

    async def __call__(self) -> Connection:
        self.calls += 1
        call = self.calls
        if self.gate is not None:
            await self.gate.wait()
        if call in self.fail_on:
            raise self.fail_on[call]
        connection = Connection(len(self.made))
        self.made.append(connection)
        return connection


async def until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition`` is true.

    Raises:
        AssertionError: The condition still fails after 1,000 loop turns.
    """
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition was still false after 1,000 loop turns")


async def borrow(pool: ResourcePool[Connection]) -> Connection:
    """Acquire a connection and release it at once."""
    async with pool.acquire() as connection:
        return connection


# Size bound and waiting


def test_max_size_bounds_racing_acquirers() -> None:
    async def scenario() -> None:
        factory = Factory()
        factory.gate = asyncio.Event()
        pool = ResourcePool(factory, max_size=5)
        release = asyncio.Event()
        seen_sizes: list[int] = []
        served: list[Connection] = []

        async def hold() -> None:
            async with pool.acquire() as connection:
                served.append(connection)
                seen_sizes.append(pool.size)
                await release.wait()

        tasks = [asyncio.create_task(hold()) for _ in range(50)]
        await until(lambda: factory.calls == 5 and pool.waiting == 45)
        assert pool.size == 5
        factory.gate.set()
        await until(lambda: pool.in_use == 5)
        assert pool.waiting == 45
        release.set()
        await asyncio.gather(*tasks)

        assert len(served) == 50
        assert factory.calls == 5
        assert max(seen_sizes) == 5
        assert pool.statistics() == PoolStatistics(
            size=5, idle=5, in_use=0, waiting=0, created=5, closed=0
        )
        await pool.aclose()

    asyncio.run(scenario())


def test_waiters_are_served_in_arrival_order() -> None:
    async def scenario() -> list[str]:
        pool = ResourcePool(Factory(), max_size=1)
        order: list[str] = []

        async def wait_for_turn(name: str) -> None:
            async with pool.acquire():
                order.append(name)

        async with pool.acquire():
            tasks = [asyncio.create_task(wait_for_turn(name)) for name in "abc"]
            await until(lambda: pool.waiting == 3)
            # A newcomer arriving while others wait queues behind them.
            tasks.append(asyncio.create_task(wait_for_turn("late")))
            await until(lambda: pool.waiting == 4)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["a", "b", "c", "late"]


def test_acquire_timeout_names_pool_and_size() -> None:
    async def scenario() -> None:
        pool = ResourcePool(Factory(), max_size=1, acquire_timeout="50ms", name="db")
        async with pool.acquire():
            with pytest.raises(
                PoolTimeoutError,
                match=r"no resource of pool 'db' was free within 0\.05 s "
                r"\(all 1 in use\)",
            ) as caught:
                await borrow(pool)
        assert caught.value.pool == "db"
        assert caught.value.size == 1
        assert caught.value.timeout == 0.05
        assert pool.waiting == 0
        assert pool.size == 1
        await pool.aclose()

    asyncio.run(scenario())


def test_acquire_timeout_spares_acquirer_served_in_time() -> None:
    async def scenario() -> None:
        pool = ResourcePool(Factory(), max_size=1, acquire_timeout=60)
        async with pool.acquire() as first:
            waiter = asyncio.create_task(borrow(pool))
            await until(lambda: pool.waiting == 1)
        assert await waiter is first
        await pool.aclose()

    asyncio.run(scenario())


# Reuse and release


def test_idle_resources_are_reused_last_in_first_out() -> None:
    async def scenario() -> None:
        pool = ResourcePool(Factory())
        async with pool.acquire() as older, pool.acquire() as newer:
            pass
        # The block released newer first, then older, so older is on top.
        assert await borrow(pool) is older
        assert newer is not older
        assert pool.created == 2
        await pool.aclose()

    asyncio.run(scenario())


def test_resource_is_reused_after_holder_raises() -> None:
    async def scenario() -> None:
        pool = ResourcePool(Factory())
        with pytest.raises(KeyError, match="missing"):
            async with pool.acquire() as first:
                raise KeyError("missing")
        assert await borrow(pool) is first
        assert first.closes == 0
        assert pool.created == 1
        await pool.aclose()

    asyncio.run(scenario())


def test_discard_closes_resource_on_release() -> None:
    async def scenario() -> None:
        pool = ResourcePool(Factory())
        with pytest.raises(ConnectionError):
            async with pool.acquire() as broken:
                pool.discard(broken)
                raise ConnectionError("reset by peer")
        assert broken.closes == 1
        assert pool.size == 0
        assert pool.closed == 1
        assert await borrow(pool) is not broken
        await pool.aclose()

    asyncio.run(scenario())


def test_discard_rejects_resource_not_in_use() -> None:
    async def scenario() -> None:
        pool = ResourcePool(Factory(), name="db")
        connection = await borrow(pool)
        with pytest.raises(ValueError, match="not in use from pool 'db'"):
            pool.discard(connection)
        with pytest.raises(ValueError, match="not in use from pool 'db'"):
            pool.discard(Connection(99))
        await pool.aclose()

    asyncio.run(scenario())


# Checks


def test_check_failure_replaces_resource() -> None:
    async def scenario() -> None:
        pool = ResourcePool(Factory(), check=lambda c: c.usable)
        first = await borrow(pool)
        first.usable = False
        second = await borrow(pool)
        assert second is not first
        assert first.closes == 1
        assert pool.created == 2
        assert pool.closed == 1
        assert pool.size == 1
        await pool.aclose()

    asyncio.run(scenario())


def test_raising_check_replaces_resource(caplog: pytest.LogCaptureFixture) -> None:
    async def failing_ping(connection: Connection) -> bool:
        raise ConnectionError("ping failed")

    async def scenario() -> None:
        pool = ResourcePool(Factory(), check=failing_ping, name="db")
        first = await borrow(pool)
        second = await borrow(pool)
        assert second is not first
        assert first.closes == 1
        await pool.aclose()

    with caplog.at_level(logging.WARNING, logger="batchtools.pool"):
        asyncio.run(scenario())
    assert "the check of a resource of pool 'db' raised an error" in caplog.text
    assert "ping failed" in caplog.text


def test_failed_check_prefers_another_idle_resource() -> None:
    async def scenario() -> None:
        pool = ResourcePool(Factory(), check=lambda c: c.usable)
        async with pool.acquire() as stale, pool.acquire() as spare:
            pass
        # stale was released last, so it is on top of the idle stack.
        stale.usable = False
        assert await borrow(pool) is spare
        assert stale.closes == 1
        assert pool.created == 2
        await pool.aclose()

    asyncio.run(scenario())


def test_check_cancelled_closes_resource() -> None:
    async def scenario() -> None:
        checking = asyncio.Event()

        async def slow_check(connection: Connection) -> bool:
            checking.set()
            await asyncio.Event().wait()
            return True

        pool = ResourcePool(Factory(), check=slow_check)
        first = await borrow(pool)
        task = asyncio.create_task(borrow(pool))
        await checking.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: first.closes == 1)
        assert pool.size == 0
        await pool.aclose()

    asyncio.run(scenario())


# Idle timeout


def test_idle_timeout_closes_only_above_min_size() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        factory = Factory()
        pool = ResourcePool(
            factory, min_size=1, max_size=3, idle_timeout=10, clock=clock
        )
        await pool.open()
        async with pool.acquire(), pool.acquire(), pool.acquire():
            pass
        # Released in reverse order: made[2], made[1], then made[0] on top.
        clock.advance(9.5)
        assert await pool.reap() == 0
        clock.advance(0.5)
        assert await pool.reap() == 2
        assert [c.closes for c in factory.made] == [0, 1, 1]
        assert pool.size == 1
        clock.advance(100)
        assert await pool.reap() == 0
        assert pool.idle == 1
        await pool.aclose()

    asyncio.run(scenario())


def test_min_size_counts_resources_in_use() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        pool = ResourcePool(
            Factory(), min_size=1, max_size=2, idle_timeout="10s", clock=clock
        )
        async with pool.acquire():
            idle_one = await borrow(pool)
            clock.advance(10)
            assert await pool.reap() == 1
            assert idle_one.closes == 1
            assert pool.size == 1
        await pool.aclose()

    asyncio.run(scenario())


def test_acquire_closes_expired_resources_in_background() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        pool = ResourcePool(Factory(), idle_timeout=10, clock=clock)
        expired = await borrow(pool)
        clock.advance(10)
        fresh = await borrow(pool)
        assert fresh is not expired
        await until(lambda: expired.closes == 1)
        assert pool.size == 1
        await pool.aclose()

    asyncio.run(scenario())


# Factory errors and cancellation


def test_factory_error_frees_slot() -> None:
    async def scenario() -> None:
        factory = Factory()
        factory.fail_on[1] = OSError("connection refused")
        pool = ResourcePool(factory, max_size=1)
        with pytest.raises(OSError, match="connection refused"):
            await borrow(pool)
        assert pool.size == 0
        assert (await borrow(pool)).number == 0
        await pool.aclose()

    asyncio.run(scenario())


def test_factory_error_hands_slot_to_waiter() -> None:
    async def scenario() -> None:
        factory = Factory()
        factory.gate = asyncio.Event()
        factory.fail_on[1] = OSError("connection refused")
        pool = ResourcePool(factory, max_size=1)
        first = asyncio.create_task(borrow(pool))
        second = asyncio.create_task(borrow(pool))
        await until(lambda: pool.waiting == 1)
        factory.gate.set()
        with pytest.raises(OSError, match="connection refused"):
            await first
        assert (await second).number == 0
        assert factory.calls == 2
        await pool.aclose()

    asyncio.run(scenario())


def test_factory_returning_none_raises() -> None:
    async def scenario() -> None:
        pool = ResourcePool(lambda: None, name="broken")
        with pytest.raises(TypeError, match="factory of pool 'broken' returned None"):
            async with pool.acquire():
                pass
        assert pool.size == 0
        await pool.aclose()

    asyncio.run(scenario())


def test_cancelled_waiter_leaves_no_trace() -> None:
    async def scenario() -> None:
        pool = ResourcePool(Factory(), max_size=1)
        async with pool.acquire() as first:
            waiter = asyncio.create_task(borrow(pool))
            await until(lambda: pool.waiting == 1)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert pool.waiting == 0
        assert await borrow(pool) is first
        assert pool.size == 1
        await pool.aclose()

    asyncio.run(scenario())


def test_waiter_cancelled_after_handover_returns_resource() -> None:
    async def scenario() -> None:
        pool = ResourcePool(Factory(), max_size=1)
        async with pool.acquire() as first:
            waiter = asyncio.create_task(borrow(pool))
            await until(lambda: pool.waiting == 1)
        # Leaving the block handed the resource to the waiter, which has not
        # run yet; cancel it before it does.
        assert pool.waiting == 0
        assert pool.in_use == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pool.in_use == 0
        assert pool.idle == 1
        assert await borrow(pool) is first
        await pool.aclose()

    asyncio.run(scenario())


def test_waiter_cancelled_after_slot_handover_frees_slot() -> None:
    async def scenario() -> None:
        pool = ResourcePool(Factory(), max_size=1)
        async with pool.acquire() as broken:
            waiter = asyncio.create_task(borrow(pool))
            await until(lambda: pool.waiting == 1)
            pool.discard(broken)
        # Closing the discarded resource freed its slot, and the waiter was
        # granted it but has not run yet; cancel it before it does.
        assert pool.waiting == 0
        assert pool.size == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pool.size == 0
        await borrow(pool)
        assert pool.created == 2
        await pool.aclose()

    asyncio.run(scenario())


def test_cancelled_holder_closes_its_resource() -> None:
    # A holder cancelled at an await (a timeout, say) may have stopped in the
    # middle of an exchange, so the next task must not get that resource.
    async def scenario() -> None:
        pool = ResourcePool(Factory())
        entered = asyncio.Event()

        async def hold_forever() -> None:
            async with pool.acquire():
                entered.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(hold_forever())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pool.reap()
        assert pool.in_use == 0
        assert pool.idle == 0
        assert pool.closed == 1
        await borrow(pool)
        assert pool.created == 2
        await pool.aclose()

    asyncio.run(scenario())


def test_cancelled_creation_frees_slot() -> None:
    async def scenario() -> None:
        factory = Factory()
        factory.gate = asyncio.Event()
        pool = ResourcePool(factory, max_size=1)
        task = asyncio.create_task(borrow(pool))
        await until(lambda: factory.calls == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.size == 0
        factory.gate.set()
        await borrow(pool)
        assert pool.size == 1
        await pool.aclose()

    asyncio.run(scenario())


# Opening and closing


def test_open_creates_min_size_resources() -> None:
    async def scenario() -> None:
        factory = Factory()
        pool = ResourcePool(factory, min_size=3, max_size=5)
        await pool.open()
        assert pool.idle == 3
        assert pool.created == 3
        await pool.open()
        assert pool.created == 3
        await pool.aclose()

    asyncio.run(scenario())


def test_async_with_opens_and_closes_pool() -> None:
    async def scenario() -> None:
        factory = Factory()
        async with ResourcePool(factory, min_size=2) as pool:
            assert pool.idle == 2
            await borrow(pool)
        assert pool.is_closed
        assert [c.closes for c in factory.made] == [1, 1]

    asyncio.run(scenario())


def test_failed_open_closes_resources_made() -> None:
    async def scenario() -> None:
        factory = Factory()
        factory.fail_on[3] = OSError("connection refused")
        pool = ResourcePool(factory, min_size=3)
        with pytest.raises(OSError, match="connection refused"):
            async with pool:
                pass
        assert pool.is_closed
        assert [c.closes for c in factory.made] == [1, 1]

    asyncio.run(scenario())


def test_aclose_closes_every_resource_once() -> None:
    async def scenario() -> None:
        factory = Factory()
        pool = ResourcePool(factory, min_size=2, max_size=3, name="db")
        await pool.open()
        release = asyncio.Event()
        entered = asyncio.Event()

        async def hold() -> None:
            async with pool.acquire():
                entered.set()
                await release.wait()

        holder = asyncio.create_task(hold())
        await entered.wait()
        closing = asyncio.create_task(pool.aclose())
        await until(lambda: pool.closed == 1)
        assert not closing.done()
        with pytest.raises(RuntimeError, match="pool 'db' is closed"):
            await borrow(pool)
        release.set()
        await holder
        await closing
        assert [c.closes for c in factory.made] == [1, 1]
        await pool.aclose()
        assert [c.closes for c in factory.made] == [1, 1]
        assert pool.statistics() == PoolStatistics(
            size=0, idle=0, in_use=0, waiting=0, created=2, closed=2
        )

    asyncio.run(scenario())


def test_aclose_fails_waiting_acquirers() -> None:
    async def scenario() -> None:
        pool = ResourcePool(Factory(), max_size=1, name="db")
        entered = asyncio.Event()
        release = asyncio.Event()

        async def hold() -> None:
            async with pool.acquire():
                entered.set()
                await release.wait()

        holder = asyncio.create_task(hold())
        await entered.wait()
        waiter = asyncio.create_task(borrow(pool))
        await until(lambda: pool.waiting == 1)
        closing = asyncio.create_task(pool.aclose())
        with pytest.raises(RuntimeError, match="pool 'db' is closed"):
            await waiter
        release.set()
        await asyncio.gather(holder, closing)
        assert pool.size == 0

    asyncio.run(scenario())


def test_open_after_aclose_raises() -> None:
    async def scenario() -> None:
        pool = ResourcePool(Factory(), name="db")
        await pool.aclose()
        with pytest.raises(RuntimeError, match="make a new ResourcePool"):
            await pool.open()

    asyncio.run(scenario())


def test_close_function_replaces_default() -> None:
    closed: list[Connection] = []

    async def scenario() -> None:
        pool = ResourcePool(Factory(), close=closed.append)
        connection = await borrow(pool)
        await pool.aclose()
        assert closed == [connection]
        assert connection.closes == 0

    asyncio.run(scenario())


def test_sync_close_method_is_called() -> None:
    class Client:
        def __init__(self) -> None:
            self.closes = 0

        def close(self) -> None:
            self.closes += 1

    async def scenario() -> None:
        pool = ResourcePool(Client)
        async with pool.acquire() as client:
            pass
        await pool.aclose()
        assert client.closes == 1

    asyncio.run(scenario())


def test_close_error_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def failing_close(connection: Connection) -> None:
        raise OSError("socket already gone")

    async def scenario() -> None:
        pool = ResourcePool(Factory(), close=failing_close, name="db")
        await borrow(pool)
        await pool.aclose()
        assert pool.closed == 1

    with caplog.at_level(logging.WARNING, logger="batchtools.pool"):
        asyncio.run(scenario())
    assert "closing a resource of pool 'db' failed" in caplog.text
    assert "socket already gone" in caplog.text


def test_pool_rejects_second_event_loop() -> None:
    pool = ResourcePool(Factory(), name="db")
    asyncio.run(borrow(pool))
    with pytest.raises(RuntimeError, match="pool 'db' is used from another event"):
        asyncio.run(borrow(pool))


def test_repr_shows_live_counts() -> None:
    async def scenario() -> str:
        pool = ResourcePool(Factory(), max_size=2, name="db")
        async with pool.acquire():
            text = repr(pool)
        await pool.aclose()
        return text

    assert asyncio.run(scenario()) == (
        "<ResourcePool 'db' open size=1/2 idle=0 in_use=1 waiting=0>"
    )


def test_name_defaults_to_factory_name() -> None:
    async def connect() -> Connection:
        return Connection(0)

    pool = ResourcePool(connect)
    assert pool.name.endswith("connect")


# Validation


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_size": -1}, r"min_size=-1 must be at least 0"),
        ({"max_size": 0}, r"max_size=0 must be at least 1"),
        ({"min_size": True}, r"min_size=True must be an integer"),
        ({"max_size": 2.5}, r"max_size=2\.5 must be an integer"),
        (
            {"min_size": 3, "max_size": 2},
            r"min_size=3 must not exceed max_size=2; raise max_size or lower",
        ),
        (
            {"idle_timeout": 0},
            r"idle_timeout 0: it must be greater than zero; None keeps idle",
        ),
        (
            {"acquire_timeout": "-1s"},
            r"acquire_timeout '-1s'.*; None waits without a limit",
        ),
        ({"acquire_timeout": "soon"}, r"invalid ResourcePool acquire_timeout 'soon'"),
        ({"close": "yes"}, r"ResourcePool close='yes' must be a callable"),
        ({"check": 1}, r"ResourcePool check=1 must be a callable"),
    ],
)
def test_invalid_options_raise(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ResourcePool(Factory(), **options)


def test_factory_must_be_callable() -> None:
    with pytest.raises(ConfigurationError, match="factory=None must be a callable"):
        ResourcePool(cast(Any, None))


def test_durations_accept_text() -> None:
    pool = ResourcePool(Factory(), idle_timeout="5m", acquire_timeout="250ms")
    assert pool.idle_timeout == 300.0
    assert pool.acquire_timeout == 0.25


def test_acquire_context_is_async_context_manager() -> None:
    pool = ResourcePool(Factory())
    assert isinstance(pool.acquire(), contextlib.AbstractAsyncContextManager)


def test_factory_returning_a_held_object_is_rejected() -> None:
    shared = object()

    async def same() -> object:
        return shared

    async def scenario() -> None:
        pool: ResourcePool[object] = ResourcePool(same, max_size=3)
        async with pool.acquire():
            with pytest.raises(TypeError, match="already holds"):
                async with pool.acquire():
                    pass
        assert pool.size == 1
        await pool.aclose()

    asyncio.run(scenario())
