"""Measure what one adversarial guest request costs the host: peak RSS growth and loop time.

Usage (the scenario runs in a forked child, so a leak or a hang cannot hurt the test process):

    from tests.budgets.harness import ACCEPTANCE, Rig, assert_within, run_measured

    def scenario(rig: Rig) -> object:
        dev = Rng()                                   # build the device ...
        drv = rig.driver(dev)                         # ... lay out its queues in rig.mem, activate
        drv[0].add_chain(writable=[(addr, 1 << 20)] * 256)   # the hostile request
        rig.kick(dev, 0)                              # measured: the kick, then every loop turn
        return drv[0].get_used()                      # anything picklable, for the parent

    m = run_measured(scenario)                # Measurement(rss_growth, max_turn, max_wall, ...)
    assert_within(m, ACCEPTANCE, "rng: 256 aliased 1 MiB buffers")
    assert m.result == [...]

In-process (a fuzz example), `AllocationPeak` measures what Python allocated in a block.

Only the turns the scenario runs through `rig.turn()` / `rig.kick()` / `rig.settle()` are
measured, never its set-up. For each turn the harness resets the peak RSS (VmHWM, through
/proc/self/clear_refs), then reads how far the peak rose above the RSS before the turn;
`rss_growth` is the largest such rise and `max_turn` the longest turn (a turn is what holds
the device event loop: `process_queue()` for a kick, one `run_once(0)` afterwards), in CPU
time of the child (user + system, so the kernel's copies count) because the machine running
the tests is shared and wall time there measures the neighbours; `max_wall` is the same turn
in wall time, which `assert_within` bounds at WALL_SLACK times the budget (a turn that blocks
uses no CPU but holds the loop all the same).
Guest memory is a real anonymous `GuestMemory` (`mem_size` bytes at guest address 0) and
every page of it is touched before the scenario runs, so a device writing guest memory does not
count as host growth. Drive devices with `strato.virtio.testing` (`rig.driver()` wraps it).
"""

from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import time
import traceback
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from strato.events import EventLoop
from strato.memory import GuestMemory
from strato.virtio.device import VirtioDevice
from strato.virtio.testing import VirtioDriver

MiB = 1 << 20


@dataclass(frozen=True)
class Budget:
    """What one request may cost: peak RSS growth (bytes) and time in one loop turn (s)."""

    rss_bytes: int
    turn_seconds: float


# Issue 10's acceptance bound for every adversarial class (a bound, ~10x above normal).
ACCEPTANCE = Budget(rss_bytes=64 * MiB, turn_seconds=0.100)
# Wall time may exceed the CPU budget by this factor (a loaded machine), never more: a turn
# that blocks (a read on an empty pipe, say) fails here.
WALL_SLACK = 10


@dataclass(frozen=True)
class Measurement:
    rss_growth: int  # bytes: the largest peak-RSS rise above the RSS before a turn
    max_turn: float  # seconds of CPU (user + system): the longest single measured turn
    turns: int  # how many turns were measured
    result: Any  # what the scenario returned (must pickle)
    max_wall: float = 0.0  # seconds of wall time: the longest single measured turn

    def __str__(self) -> str:
        return (
            f"peak RSS +{self.rss_growth / MiB:.1f} MiB, longest turn "
            f"{self.max_turn * 1e3:.1f} ms CPU ({self.max_wall * 1e3:.1f} ms wall) over "
            f"{self.turns} turns"
        )


class AllocationPeak:
    """Peak bytes Python allocated inside a `with` block (tracemalloc), for fuzz properties
    that run in-process: `with AllocationPeak() as a: ...` then `a.peak <= budget`. Cheaper to
    set up than a child, blind to mmap (bounce buffers): the RSS tests above cover those."""

    def __init__(self) -> None:
        self.peak = 0
        self._started = False
        self._base = 0

    def __enter__(self) -> AllocationPeak:
        self._started = not tracemalloc.is_tracing()
        if self._started:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self._base = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = max(0, tracemalloc.get_traced_memory()[1] - self._base)
        if self._started:
            tracemalloc.stop()


def _status_kib(field: str) -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(field.encode() + b":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset VmHWM to the current RSS (Linux >= 4.0)


class Rig:
    """What a scenario gets in the child: guest memory, an event loop, measured turns."""

    def __init__(self, mem_size: int) -> None:
        self.mem = GuestMemory.anonymous([(0, mem_size)])
        self.mem.fill(0, mem_size, 0)  # touch every page: guest RAM is not host growth
        self.loop = EventLoop()
        self.rss_growth = 0
        self.max_turn = 0.0
        self.max_wall = 0.0
        self.turns = 0

    def driver(self, device: VirtioDevice, **kwargs: Any) -> VirtioDriver:
        """A `VirtioDriver` for `device` on this rig's memory, activated on its loop."""
        drv = VirtioDriver(device, self.mem, **kwargs)
        drv.activate(self.loop)
        return drv

    def turn(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` as one measured loop turn; returns what it returned."""
        _reset_peak()
        before = _status_kib("VmRSS")
        c0, t0 = time.process_time(), time.perf_counter()
        try:
            return fn()
        finally:
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            peak = _status_kib("VmHWM")
            self.rss_growth = max(self.rss_growth, (peak - before) * 1024)
            self.max_turn = max(self.max_turn, cpu)
            self.max_wall = max(self.max_wall, wall)
            self.turns += 1

    def settle(self, max_turns: int = 10_000) -> int:
        """Run the event loop's ready callbacks, one measured turn each, until none is ready."""
        for n in range(max_turns):
            if not self.turn(lambda: self.loop.run_once(0)):
                return n
        raise AssertionError(f"the loop was still busy after {max_turns} turns")

    def kick(self, device: VirtioDevice, queue_index: int, *, settle: bool = True) -> None:
        """Notify a queue (one measured turn), then `settle()` the loop."""
        self.turn(lambda: device.process_queue(queue_index))
        if settle:
            self.settle()


def _child(scenario: Callable[[Rig], Any], mem_size: int, wfd: int) -> None:
    # The child inherits pytest's heap: keep the collector off it, or a full collection in a
    # measured turn walks (and copies on write) hundreds of MiB that are not the device's.
    gc.freeze()
    try:
        rig = Rig(mem_size)
        result = scenario(rig)
        out: dict[str, Any] = {
            "rss_growth": rig.rss_growth,
            "max_turn": rig.max_turn,
            "max_wall": rig.max_wall,
            "turns": rig.turns,
            "result": result,
        }
    except BaseException:
        out = {"error": traceback.format_exc()}
    data = pickle.dumps(out)
    with os.fdopen(wfd, "wb") as w:
        w.write(data)


def run_measured(
    scenario: Callable[[Rig], Any], *, mem_size: int = 64 * MiB, timeout: float = 120.0
) -> Measurement:
    """Run `scenario(rig)` in a forked child and return what its measured turns cost.

    Raises AssertionError with the child's traceback if the scenario raised, or if it did not
    finish within `timeout` seconds (the child is killed: a hang is a failure too).
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(rfd)
            _child(scenario, mem_size, wfd)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([rfd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"scenario did not finish in {timeout} s (killed)")
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    if not chunks:
        raise AssertionError("scenario child died without a report")
    out = pickle.loads(b"".join(chunks))
    if "error" in out:
        raise AssertionError(f"scenario failed in the child:\n{out['error']}")
    return Measurement(
        out["rss_growth"], out["max_turn"], out["turns"], out["result"], out["max_wall"]
    )


def assert_within(m: Measurement, budget: Budget = ACCEPTANCE, what: str = "") -> None:
    """Fail, saying what was measured, if `m` is over `budget` (the line is printed too)."""
    print(f"{what}: {m}")
    assert m.turns > 0, f"{what}: nothing was measured (no rig.turn/kick)"
    assert m.rss_growth <= budget.rss_bytes, f"{what}: {m}; budget {budget.rss_bytes / MiB:.0f} MiB"
    assert m.max_turn <= budget.turn_seconds, (
        f"{what}: {m}; budget {budget.turn_seconds * 1e3:.0f} ms CPU per turn"
    )
    assert m.max_wall <= budget.turn_seconds * WALL_SLACK, (
        f"{what}: {m}; a turn blocked (budget {budget.turn_seconds * 1e3:.0f} ms x {WALL_SLACK})"
    )
