"""Token-bucket rate limiting for disks and nets, with Cloud Hypervisor's semantics.

Cloud Hypervisor's `rate_limiter` crate, in Python:

- A `TokenBucket(size, one_time_burst, refill_time_ms)` starts full (`size` tokens) plus a
  one-time burst that is spent first and never comes back. It refills continuously, `size`
  tokens every `refill_time_ms`, never above `size`. A size or refill time of 0 disables it.
- `reduce(n)` on a bucket: success (n taken), failure (not enough: nothing taken), or
  over-consumption when n is larger than the whole bucket: the bucket is emptied, the request
  goes through, and the ratio says for how many refill periods the bucket is "in debt".
- A `RateLimiter` holds a bandwidth bucket (bytes) and an operations bucket. When a `consume`
  fails it becomes *blocked* and arms a one-shot timer for 100 ms (over-consumption: for
  `ratio * refill_time`). While blocked every `consume` fails. The device stops processing
  the queue, leaving the request where it was (it waits, it is never dropped), and resumes when
  the timer fires: `event_handler()` unblocks the limiter.

Two deliberate differences from the crate: refills keep the fraction of a token that has not
accrued yet (the crate resets its clock on every call and loses it, so frequent small
requests under-refill), and a delay never rounds down to zero (a zero timerfd setting would
disarm the timer and leave the limiter blocked for good).

The limiter is pure apart from its optional `timer` (anything with `arm(ns)`, `disarm()`,
`read()`, `fileno()`, `close()`; `strato._sys.timerfd.TimerFd` in the VMM) and takes its time
from an injectable `clock` returning nanoseconds, so tests can drive it with a fake clock.
A limiter is used from one thread (the device's event-loop thread).
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from strato._sys.timerfd import TimerFd

NS_PER_MS = 1_000_000
REFILL_TIMER_INTERVAL_MS = 100  # how long a failed consume() blocks the limiter
REFILL_TIMER_INTERVAL_NS = REFILL_TIMER_INTERVAL_MS * NS_PER_MS

Clock = Callable[[], int]


class TokenType(enum.Enum):
    BYTES = "bytes"
    OPS = "ops"


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    OVER_CONSUMPTION = "over_consumption"


class BucketReduction(NamedTuple):
    outcome: Outcome
    ratio: float = 0.0  # over-consumption: tokens beyond the budget / bucket size


class TokenBucket:
    """`size` tokens refilled every `refill_time_ms`, plus a one-time burst spent first."""

    def __init__(self, size: int, one_time_burst: int, refill_time_ms: int, now_ns: int) -> None:
        if size <= 0 or refill_time_ms <= 0:
            raise ValueError(
                f"a token bucket needs a size and a refill time (got {size}, {refill_time_ms} ms)"
            )
        if one_time_burst < 0:
            raise ValueError(f"one_time_burst {one_time_burst} is negative")
        self.size = size
        self.one_time_burst = one_time_burst
        self.refill_time_ms = refill_time_ms
        self.budget = size  # starts full
        self.last_update = now_ns
        # tokens = elapsed_ns * size / refill_ns, kept as a reduced fraction (exact integers)
        refill_ns = refill_time_ms * NS_PER_MS
        common = math.gcd(size, refill_ns)
        self._per = size // common  # tokens ...
        self._every_ns = refill_ns // common  # ... per this many nanoseconds

    @classmethod
    def create(
        cls, size: int, one_time_burst: int, refill_time_ms: int, now_ns: int
    ) -> TokenBucket | None:
        """None when `size` or `refill_time_ms` is 0: limiting is off for this token type."""
        if size == 0 or refill_time_ms == 0:
            return None
        return cls(size, one_time_burst, refill_time_ms, now_ns)

    def _refill(self, now_ns: int) -> None:
        elapsed = now_ns - self.last_update
        if elapsed <= 0:
            return
        tokens = elapsed * self._per // self._every_ns
        if self.budget + tokens >= self.size:
            self.budget = self.size
            self.last_update = now_ns  # a full bucket banks no time
        elif tokens:
            self.budget += tokens
            # Advance only by the time those whole tokens took (rounded up, so that no time is
            # credited twice); the rest keeps accruing.
            self.last_update += -(-tokens * self._every_ns // self._per)

    def reduce(self, tokens: int, now_ns: int) -> BucketReduction:
        if tokens < 0:
            raise ValueError(f"cannot take {tokens} tokens")
        if self.one_time_burst > 0:
            if self.one_time_burst >= tokens:
                self.one_time_burst -= tokens
                self.last_update = now_ns
                return BucketReduction(Outcome.SUCCESS)
            tokens -= self.one_time_burst
            self.one_time_burst = 0
        self._refill(now_ns)
        if tokens > self.budget:
            if tokens > self.size:
                # Larger than the whole bucket: let it through, empty the bucket, and report
                # how many bucket-fulls it borrowed so the caller can block for that long.
                tokens -= self.budget
                self.budget = 0
                return BucketReduction(Outcome.OVER_CONSUMPTION, tokens / self.size)
            return BucketReduction(Outcome.FAILURE)
        self.budget -= tokens
        return BucketReduction(Outcome.SUCCESS)

    def replenish(self, tokens: int) -> None:
        """Give tokens back (an undone consume). During the burst they go to the burst."""
        if self.one_time_burst > 0:
            self.one_time_burst += tokens
            return
        self.budget = min(self.budget + tokens, self.size)

    def state(self) -> dict[str, int]:
        return {
            "size": self.size,
            "one_time_burst": self.one_time_burst,
            "refill_time": self.refill_time_ms,
            "budget": self.budget,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], now_ns: int) -> TokenBucket:
        b = cls(int(state["size"]), int(state["one_time_burst"]), int(state["refill_time"]), now_ns)
        b.budget = max(0, min(int(state["budget"]), b.size))
        return b


class BucketUpdate:
    """What `RateLimiter.update_buckets` does to one bucket: keep, disable or replace it."""

    __slots__ = ("bucket", "kind")

    def __init__(self, kind: str, bucket: TokenBucket | None = None) -> None:
        self.kind = kind
        self.bucket = bucket

    @classmethod
    def none(cls) -> BucketUpdate:
        return cls("none")

    @classmethod
    def disabled(cls) -> BucketUpdate:
        return cls("disabled")

    @classmethod
    def update(cls, bucket: TokenBucket) -> BucketUpdate:
        return cls("update", bucket)


class WakeupTimer(Protocol):
    def arm(self, delay_ns: int) -> None: ...
    def disarm(self) -> None: ...
    def read(self) -> int: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...


class RateLimits(Protocol):
    """The six numbers of Cloud Hypervisor's rate limiter options (vmm's RateLimiterConfig)."""

    @property
    def bw_size(self) -> int: ...
    @property
    def bw_one_time_burst(self) -> int: ...
    @property
    def bw_refill_time(self) -> int: ...
    @property
    def ops_size(self) -> int: ...
    @property
    def ops_one_time_burst(self) -> int: ...
    @property
    def ops_refill_time(self) -> int: ...


class RateLimiter:
    """A bandwidth bucket and an operations bucket; blocked (and timed) when one runs dry."""

    def __init__(
        self,
        bandwidth: TokenBucket | None = None,
        ops: TokenBucket | None = None,
        *,
        clock: Clock = time.monotonic_ns,
        timer: WakeupTimer | None = None,
    ) -> None:
        self.bandwidth = bandwidth
        self.ops = ops
        self.clock = clock
        self.timer = timer
        self.blocked = False
        self.wake_at: int | None = None  # clock time at which the timer fires
        self.throttled = 0  # times a consume() failed or over-consumed (a counter)

    @classmethod
    def create(
        cls,
        bw_size: int = 0,
        bw_one_time_burst: int = 0,
        bw_refill_time: int = 0,
        ops_size: int = 0,
        ops_one_time_burst: int = 0,
        ops_refill_time: int = 0,
        *,
        clock: Clock = time.monotonic_ns,
        timer: WakeupTimer | None = None,
    ) -> RateLimiter:
        """Cloud Hypervisor's `RateLimiter::new` argument order; refill times in ms."""
        for name, value in (
            ("bw_size", bw_size),
            ("bw_one_time_burst", bw_one_time_burst),
            ("bw_refill_time", bw_refill_time),
            ("ops_size", ops_size),
            ("ops_one_time_burst", ops_one_time_burst),
            ("ops_refill_time", ops_refill_time),
        ):
            if value < 0:
                raise ValueError(f"rate limiter {name}={value} is negative")
        now = clock()
        return cls(
            TokenBucket.create(bw_size, bw_one_time_burst, bw_refill_time, now),
            TokenBucket.create(ops_size, ops_one_time_burst, ops_refill_time, now),
            clock=clock,
            timer=timer,
        )

    @property
    def enabled(self) -> bool:
        return self.bandwidth is not None or self.ops is not None

    def _bucket(self, token_type: TokenType) -> TokenBucket | None:
        return self.bandwidth if token_type is TokenType.BYTES else self.ops

    # -- the data path --------------------------------------------------------------------------
    def consume(self, tokens: int, token_type: TokenType) -> bool:
        """Take `tokens`; False (and blocked until the timer fires) when there are too few."""
        if self.blocked:
            return False
        bucket = self._bucket(token_type)
        if bucket is None:
            return True
        result = bucket.reduce(tokens, self.clock())
        if result.outcome is Outcome.FAILURE:
            self._block(REFILL_TIMER_INTERVAL_NS)
            return False
        if result.outcome is Outcome.OVER_CONSUMPTION:
            # It goes through, but nothing else may for as long as it takes to repay the debt.
            self._block(max(1, int(result.ratio * bucket.refill_time_ms * NS_PER_MS)))
        return True

    def manual_replenish(self, tokens: int, token_type: TokenType) -> None:
        bucket = self._bucket(token_type)
        if bucket is not None:
            bucket.replenish(tokens)

    def _block(self, delay_ns: int) -> None:
        self.blocked = True
        self.throttled += 1
        self.wake_at = self.clock() + delay_ns
        if self.timer is not None:
            self.timer.arm(delay_ns)

    # -- the timer ---------------------------------------------------------------------------
    def fileno(self) -> int | None:
        """The fd to watch for EPOLLIN (the timer's), or None without a timer."""
        return None if self.timer is None else self.timer.fileno()

    def event_handler(self) -> bool:
        """The timer fired: unblock. Returns whether the limiter was blocked."""
        if self.timer is not None:
            self.timer.read()
        was = self.blocked
        self.blocked = False
        self.wake_at = None
        return was

    def expire_if_due(self) -> bool:
        """Without a timer (tests): unblock once the clock reaches `wake_at`."""
        if self.blocked and self.wake_at is not None and self.clock() >= self.wake_at:
            return self.event_handler()
        return False

    def unblock(self) -> None:
        """Forget a pending block and its timer (device reset)."""
        if self.timer is not None:
            self.timer.disarm()
            self.timer.read()
        self.blocked = False
        self.wake_at = None

    def update_buckets(self, bandwidth: BucketUpdate, ops: BucketUpdate) -> None:
        """Replace or disable buckets at run time (a new bucket starts full)."""
        if bandwidth.kind == "disabled":
            self.bandwidth = None
        elif bandwidth.kind == "update":
            self.bandwidth = bandwidth.bucket
        if ops.kind == "disabled":
            self.ops = None
        elif ops.kind == "update":
            self.ops = ops.bucket

    def close(self) -> None:
        if self.timer is not None:
            self.timer.close()

    # -- snapshots ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "bandwidth": None if self.bandwidth is None else self.bandwidth.state(),
            "ops": None if self.ops is None else self.ops.state(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Budgets come back; the clock restarts now and any block is forgotten."""
        now = self.clock()
        bw, ops = state.get("bandwidth"), state.get("ops")
        self.bandwidth = None if bw is None else TokenBucket.from_state(bw, now)
        self.ops = None if ops is None else TokenBucket.from_state(ops, now)
        self.unblock()


def rate_limiter_from(
    limits: RateLimits | None,
    *,
    clock: Clock = time.monotonic_ns,
    timer_factory: Callable[[], WakeupTimer] | None = TimerFd,
) -> RateLimiter | None:
    """A limiter for `limits` with its own timer, or None when nothing is limited."""
    if limits is None:
        return None
    limiter = RateLimiter.create(
        limits.bw_size,
        limits.bw_one_time_burst,
        limits.bw_refill_time,
        limits.ops_size,
        limits.ops_one_time_burst,
        limits.ops_refill_time,
        clock=clock,
    )
    if not limiter.enabled:
        return None
    if timer_factory is not None:
        limiter.timer = timer_factory()
    return limiter
