"""Token buckets and the rate limiter (Cloud Hypervisor's semantics), on a fake clock, and
virtio-blk throttled through them: a throttled request waits in its queue, it is never dropped."""

from __future__ import annotations

import select
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strato._sys.timerfd import TimerFd
from strato.devices.backends.raw import RawFile
from strato.devices.rate_limiter import (
    NS_PER_MS,
    REFILL_TIMER_INTERVAL_NS,
    BucketUpdate,
    Outcome,
    RateLimiter,
    TokenBucket,
    TokenType,
    rate_limiter_from,
)
from strato.devices.virtio.block import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Block,
)
from strato.events import EventLoop
from strato.memory import GuestMemory
from strato.virtio.testing import DriverChain, DriverQueue, VirtioDriver
from tests.devices.rate_limiter_fakes import FakeClock, FakeTimer

MS = NS_PER_MS
OPS, BYTES = TokenType.OPS, TokenType.BYTES


# -- TokenBucket ------------------------------------------------------------------------------
def test_bucket_disabled_by_zero_size_or_refill() -> None:
    assert TokenBucket.create(0, 1234, 1000, 0) is None
    assert TokenBucket.create(100, 1234, 0, 0) is None
    with pytest.raises(ValueError):
        TokenBucket(0, 0, 100, 0)


def test_bucket_starts_full_and_refills_at_its_rate() -> None:
    clock = FakeClock()
    b = TokenBucket(1000, 0, 1000, clock())  # 1 token per ms
    assert b.budget == 1000
    assert b.reduce(123, clock()).outcome is Outcome.SUCCESS
    assert b.budget == 877
    clock.advance(123 * MS)
    assert b.reduce(1, clock()).outcome is Outcome.SUCCESS
    assert b.budget == 999
    assert b.reduce(100, clock()).outcome is Outcome.SUCCESS
    assert b.reduce(1000, clock()).outcome is Outcome.FAILURE
    assert b.budget == 899  # a failure takes nothing
    clock.advance(10_000 * MS)
    b.reduce(0, clock())
    assert b.budget == 1000  # never above size


def test_bucket_one_time_burst_then_over_consumption() -> None:
    # Cloud Hypervisor's test_token_bucket_reduce, second part, on a fake clock.
    clock = FakeClock()
    b = TokenBucket(1000, 1100, 1000, clock())
    assert b.reduce(1000, clock()).outcome is Outcome.SUCCESS
    assert b.one_time_burst == 100
    assert b.reduce(500, clock()).outcome is Outcome.SUCCESS
    assert b.one_time_burst == 0
    assert b.reduce(500, clock()).outcome is Outcome.SUCCESS
    assert b.reduce(500, clock()).outcome is Outcome.FAILURE
    clock.advance(500 * MS)
    assert b.reduce(500, clock()).outcome is Outcome.SUCCESS
    clock.advance(1000 * MS)
    assert tuple(b.reduce(2500, clock())) == (Outcome.OVER_CONSUMPTION, 1.5)
    assert b.budget == 0


def test_bucket_keeps_fractions_of_a_token() -> None:
    # 1 token per 10 ms, asked every 1 ms: the crate would never refill; we must.
    clock = FakeClock()
    b = TokenBucket(10, 0, 100, clock())
    b.reduce(10, clock())
    granted = 0
    for _ in range(1000):
        clock.advance(MS)
        if b.reduce(1, clock()).outcome is Outcome.SUCCESS:
            granted += 1
    assert granted == 100


def test_bucket_replenish_goes_to_the_burst_first() -> None:
    clock = FakeClock()
    b = TokenBucket(100, 10, 1000, clock())
    b.reduce(5, clock())
    b.replenish(3)
    assert b.one_time_burst == 8 and b.budget == 100
    b.reduce(8 + 50, clock())
    b.replenish(1000)
    assert b.budget == 100


# -- RateLimiter ------------------------------------------------------------------------------
def test_disabled_limiter_lets_everything_through() -> None:
    rl = RateLimiter.create()
    assert not rl.enabled
    assert rl.consume(1 << 62, OPS) and rl.consume(1 << 62, BYTES)
    assert not rl.blocked
    assert rate_limiter_from(None) is None


def test_failure_blocks_both_token_types_until_the_timer() -> None:
    clock, timer = FakeClock(), FakeTimer()
    rl = RateLimiter.create(1000, 0, 1000, 1000, 0, 1000, clock=clock, timer=timer)
    assert rl.consume(1000, OPS) and rl.consume(1000, BYTES)
    assert not rl.consume(100, OPS)
    assert rl.blocked and timer.armed == [REFILL_TIMER_INTERVAL_NS]
    assert rl.wake_at == clock() + REFILL_TIMER_INTERVAL_NS
    assert not rl.consume(1, BYTES)  # blocked: everything waits
    assert timer.armed == [REFILL_TIMER_INTERVAL_NS]  # one timer at a time
    clock.advance(REFILL_TIMER_INTERVAL_NS)
    assert rl.event_handler() and timer.reads == 1
    assert not rl.blocked
    assert rl.consume(100, OPS) and rl.consume(100, BYTES)
    assert not rl.event_handler()  # spurious: nothing was blocked
    assert rl.throttled == 1


def test_over_consumption_goes_through_and_blocks_for_the_debt() -> None:
    clock, timer = FakeClock(), FakeTimer()
    rl = RateLimiter.create(1000, 0, 200, clock=clock, timer=timer)
    assert rl.consume(3500, BYTES)  # 2.5 bucket-fulls beyond the 1000 there
    assert rl.blocked and timer.armed == [500 * MS]  # 2.5 x 200 ms
    assert not rl.consume(1, BYTES)


def test_tiny_over_consumption_still_arms_the_timer() -> None:
    clock, timer = FakeClock(), FakeTimer()
    rl = RateLimiter.create(ops_size=1_000_000_000, ops_refill_time=1, clock=clock, timer=timer)
    assert rl.consume(1_000_000_001, OPS)
    assert rl.blocked and timer.armed and timer.armed[0] >= 1


def test_manual_replenish_undoes_a_consume() -> None:
    rl = RateLimiter.create(1000, 0, 1000, 1000, 0, 1000, clock=FakeClock())
    assert rl.consume(123, BYTES)
    rl.manual_replenish(23, BYTES)
    assert rl.bandwidth is not None and rl.bandwidth.budget == 900
    assert rl.consume(123, OPS)
    rl.manual_replenish(23, OPS)
    assert rl.ops is not None and rl.ops.budget == 900


def test_update_buckets_and_unblock() -> None:
    clock, timer = FakeClock(), FakeTimer()
    rl = RateLimiter.create(ops_size=1, ops_refill_time=1000, clock=clock, timer=timer)
    rl.consume(1, OPS)
    assert not rl.consume(1, OPS)
    rl.unblock()
    assert not rl.blocked and timer.disarmed == 1
    rl.update_buckets(BucketUpdate.update(TokenBucket(10, 0, 1000, clock())), BucketUpdate.none())
    assert rl.bandwidth is not None and rl.ops is not None
    rl.update_buckets(BucketUpdate.none(), BucketUpdate.disabled())
    assert rl.ops is None and rl.consume(1 << 40, OPS)
    assert rl.consume(10, BYTES) and not rl.consume(1, BYTES)


def test_state_round_trip() -> None:
    clock = FakeClock()
    rl = RateLimiter.create(1000, 50, 100, 10, 0, 100, clock=clock)
    rl.consume(700, BYTES)
    rl.consume(3, OPS)
    state = rl.state()
    other = RateLimiter.create(1, 0, 1, clock=clock)
    other.restore(state)
    assert other.state() == state
    assert other.bandwidth is not None and other.bandwidth.budget == 350
    assert other.ops is not None and other.ops.budget == 7


def test_expire_if_due_without_a_timer() -> None:
    clock = FakeClock()
    rl = RateLimiter.create(ops_size=1, ops_refill_time=100, clock=clock)
    rl.consume(1, OPS)
    assert not rl.consume(1, OPS)
    clock.advance(REFILL_TIMER_INTERVAL_NS - 1)
    assert not rl.expire_if_due() and rl.blocked
    clock.advance(1)
    assert rl.expire_if_due() and not rl.blocked


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 500),
    burst=st.integers(0, 500),
    refill_ms=st.integers(1, 1000),
    steps=st.lists(st.tuples(st.integers(0, 50 * MS), st.integers(0, 600)), max_size=80),
)
def test_granted_never_exceeds_size_burst_and_rate(
    size: int, burst: int, refill_ms: int, steps: list[tuple[int, int]]
) -> None:
    """Whatever the pattern of requests that fit the bucket: granted <= size + burst + rate x
    elapsed, and a blocked limiter grants nothing. (A request larger than the bucket passes and
    then blocks the limiter, and refill continues meanwhile, as in Cloud Hypervisor; that case
    has its own tests.)"""
    clock = FakeClock()
    start = clock()
    rl = RateLimiter.create(ops_size=size, ops_one_time_burst=burst, ops_refill_time=refill_ms,
                            clock=clock)  # fmt: skip
    granted = 0
    biggest = 0
    for wait, asked in steps:
        tokens = min(asked, size)
        clock.advance(wait)
        rl.expire_if_due()
        was_blocked = rl.blocked
        if rl.consume(tokens, OPS):
            assert not was_blocked
            granted += tokens
            biggest = max(biggest, tokens)
    elapsed = clock() - start
    bound = size + burst + elapsed * size / (refill_ms * MS)
    assert granted <= bound + 1e-6, (granted, bound, biggest)


# -- the timerfd -----------------------------------------------------------------------------
def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_timerfd_fires_once_after_its_delay() -> None:
    with TimerFd() as t:
        assert not readable(t.fd, 0)
        assert t.read() == 0
        t.arm(20 * MS)
        assert not readable(t.fd, 0)
        assert readable(t.fd, 5.0)
        assert t.read() == 1
        assert not readable(t.fd, 0)
        t.arm(10 * 1000 * MS)
        t.disarm()
        assert not readable(t.fd, 0.05)


def test_limiter_timer_is_a_timerfd() -> None:
    class Limits:
        bw_size, bw_one_time_burst, bw_refill_time = 0, 0, 0
        ops_size, ops_one_time_burst, ops_refill_time = 1, 0, 100

    rl = rate_limiter_from(Limits())
    assert rl is not None and isinstance(rl.timer, TimerFd)
    fd = rl.fileno()
    assert fd is not None
    try:
        assert rl.consume(1, OPS) and not rl.consume(1, OPS)
        assert not readable(fd, 0)
        assert readable(fd, 5.0)
        assert rl.event_handler() and not rl.blocked
    finally:
        rl.close()
    assert rl.timer is not None and rl.timer.fileno() == -1


# -- virtio-blk behind a limiter -------------------------------------------------------------
MiB = 1 << 20


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, 4 * MiB)])
    yield m
    m.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    p.write_bytes(bytes(i % 251 for i in range(2048 * 512)))
    return p


def blk_request(dq: DriverQueue, rtype: int, sector: int = 0, nbytes: int = 512) -> DriverChain:
    header = struct.pack("<IIQ", rtype, 0, sector)
    if rtype == VIRTIO_BLK_T_OUT:
        return dq.add_chain([header, b"\xab" * nbytes], [1])
    if rtype == VIRTIO_BLK_T_IN:
        return dq.add_chain([header], [nbytes, 1])
    return dq.add_chain([header], [1])


def blk_status(mem: GuestMemory, chain: DriverChain) -> int:
    addr, length = chain.writable[-1]
    return mem.read(addr + length - 1, 1)[0]


def limited_block(
    mem: GuestMemory, loop: EventLoop, image: Path, rl: RateLimiter
) -> tuple[Block, VirtioDriver]:
    dev = Block(RawFile(str(image)), rate_limiter=rl)
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    return dev, drv


def test_block_ops_limit_queues_requests_and_resumes_on_the_timer(
    mem: GuestMemory, loop: EventLoop, image: Path
) -> None:
    clock, timer = FakeClock(), FakeTimer()
    rl = RateLimiter.create(ops_size=4, ops_refill_time=100, clock=clock, timer=timer)
    dev, drv = limited_block(mem, loop, image, rl)
    chains = [blk_request(drv[0], VIRTIO_BLK_T_IN, sector=i) for i in range(10)]
    drv.kick(0)
    used = drv[0].get_used()
    assert [h for h, _ in used] == [c.head for c in chains[:4]]
    assert rl.blocked and timer.armed == [REFILL_TIMER_INTERVAL_NS]
    assert dev.queues[0].pending(mem) == 6  # the rest wait in the ring, untouched
    assert all(blk_status(mem, c) == 0 and dev.stats["read_ops"] == 4 for c in chains[4:])
    drv.kick(0)  # a notify while blocked processes nothing
    assert drv[0].get_used() == []
    for _ in range(2):
        clock.advance(REFILL_TIMER_INTERVAL_NS)
        dev._on_rate_limiter_timer(select.EPOLLIN)  # what the loop calls when the timer fires
        used += drv[0].get_used()
    assert len(used) == 10 and dev.stats["read_ops"] == 10
    assert [h for h, _ in used] == [c.head for c in chains]  # in order, none dropped
    assert all(blk_status(mem, c) == VIRTIO_BLK_S_OK for c in chains)
    assert dev.stats["errors"] == 0


def test_block_bandwidth_limit_counts_data_bytes_only(
    mem: GuestMemory, loop: EventLoop, image: Path
) -> None:
    clock, timer = FakeClock(), FakeTimer()
    rl = RateLimiter.create(bw_size=2048, bw_refill_time=100, clock=clock, timer=timer)
    dev, drv = limited_block(mem, loop, image, rl)
    writes = [blk_request(drv[0], VIRTIO_BLK_T_OUT, sector=i, nbytes=1024) for i in range(3)]
    flush = blk_request(drv[0], VIRTIO_BLK_T_FLUSH)
    drv.kick(0)
    assert len(drv[0].get_used()) == 2 and rl.blocked
    assert rl.ops is None and rl.bandwidth is not None and rl.bandwidth.budget == 0
    clock.advance(REFILL_TIMER_INTERVAL_NS)
    dev._on_rate_limiter_timer(select.EPOLLIN)
    # the third write takes 1024 of the 2048 refilled; the flush moves no data
    assert len(drv[0].get_used()) == 2 and not rl.blocked
    assert all(blk_status(mem, c) == VIRTIO_BLK_S_OK for c in [*writes, flush])
    assert dev.stats["write_bytes"] == 3072 and dev.stats["flush_ops"] == 1


def test_block_request_larger_than_the_bucket_goes_through_then_blocks(
    mem: GuestMemory, loop: EventLoop, image: Path
) -> None:
    clock, timer = FakeClock(), FakeTimer()
    rl = RateLimiter.create(bw_size=1024, bw_refill_time=100, clock=clock, timer=timer)
    dev, drv = limited_block(mem, loop, image, rl)
    big = blk_request(drv[0], VIRTIO_BLK_T_IN, nbytes=4096)
    small = blk_request(drv[0], VIRTIO_BLK_T_IN, nbytes=512)
    drv.kick(0)
    assert [h for h, _ in drv[0].get_used()] == [big.head]
    assert timer.armed == [300 * MS]  # 3 bucket-fulls of debt x 100 ms
    clock.advance(300 * MS)
    dev._on_rate_limiter_timer(select.EPOLLIN)
    assert [h for h, _ in drv[0].get_used()] == [small.head]
    assert blk_status(mem, small) == VIRTIO_BLK_S_OK


def test_block_reset_forgets_a_pending_block(
    mem: GuestMemory, loop: EventLoop, image: Path
) -> None:
    clock, timer = FakeClock(), FakeTimer()
    rl = RateLimiter.create(ops_size=1, ops_refill_time=100, clock=clock, timer=timer)
    dev, drv = limited_block(mem, loop, image, rl)
    for i in range(3):
        blk_request(drv[0], VIRTIO_BLK_T_IN, sector=i)
    drv.kick(0)
    assert rl.blocked
    dev.reset()
    assert not rl.blocked and timer.disarmed == 1
    dev.close()
    assert timer.closed


def test_block_limited_on_a_real_event_loop(mem: GuestMemory, image: Path) -> None:
    """The timerfd is registered on the device's loop and resumes the queue by itself."""
    import time

    loop = EventLoop()
    rl = RateLimiter.create(ops_size=2, ops_refill_time=50, timer=TimerFd())
    dev, drv = limited_block(mem, loop, image, rl)
    try:
        chains = [blk_request(drv[0], VIRTIO_BLK_T_IN, sector=i) for i in range(6)]
        drv.kick(0)
        used = drv[0].get_used()
        assert len(used) == 2
        deadline = time.monotonic() + 10
        while len(used) < 6:
            assert time.monotonic() < deadline, f"only {len(used)} of 6 completed"
            loop.run_once(0.5)
            used += drv[0].get_used()
        assert all(blk_status(mem, c) == VIRTIO_BLK_S_OK for c in chains)
        assert rl.throttled >= 2
    finally:
        dev.reset()
        dev.close()
        loop.close()
