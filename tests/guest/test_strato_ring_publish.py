"""strato changes the used-ring words a polling driver reads in one store each.

Found with the built-in guest under strato (`irq=poll`, 2 vCPUs): now and then the guest's
net check failed with "the device returned bad used elements (rx=0 tx=65536)". The guest
polls the used ring's idx; strato wrote it with `struct.pack_into`, and CPython's
`s_pack_internal` clears its destination (memset) before it packs, so for an instant the idx
read 0: 65535 entries behind, which the guest takes as 65535 new ones. A watchpoint showed it
(8 -> 0 -> 9 on one `pack_into`). The same applies to avail_event, which the driver reads to
decide whether to notify. `Queue` now stores these through a 16-bit view (one store).

Here a thread in C reads the word as fast as it can while Python writes it: first through
`struct.pack_into`, to show the watcher can see the zero on this machine, then through
`Queue`, which must never show one.
"""

from __future__ import annotations

import ctypes
import itertools
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from strato.memory import GuestMemory
from strato.virtio.queue import Queue

WATCHER_SOURCE = Path(__file__).with_name("strato_watch16.c")
QUEUE_SIZE = 256
DESC, AVAIL, USED = 0x1000, 0x3000, 0x4000
USED_IDX = USED + 2
AVAIL_EVENT = USED + 4 + 8 * QUEUE_SIZE
ENOUGH_CHANGES = 50_000  # values the watcher saw change before we call a run conclusive
DEADLINE = 5.0


@pytest.fixture(scope="module")
def watcher(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    lib_path = tmp_path_factory.mktemp("watch16") / "libwatch16.so"
    subprocess.run(
        [gcc, "-O2", "-shared", "-fPIC", "-o", str(lib_path), str(WATCHER_SOURCE), "-lpthread"],
        check=True,
    )
    lib = ctypes.CDLL(str(lib_path))
    lib.watch_changes.restype = ctypes.c_long
    lib.watch_zeros.restype = ctypes.c_long
    return lib


def nonzero_values() -> Iterator[int]:
    """1, 2, ... 0x7000, 1, ...: a sequence in which a 0 can only come from a torn write."""
    return itertools.cycle(range(1, 0x7001))


def zeros_seen(
    lib: ctypes.CDLL, mem: GuestMemory, addr: int, write: Callable[[int], None]
) -> tuple[int, int]:
    """Write nonzero_values() at `addr` until the watcher saw enough of them; (zeros, changes)."""
    view = mem.view(addr, 2)
    address = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(view)))
    assert lib.watch_start(address) == 0, "pthread_create failed"
    try:
        deadline = time.monotonic() + DEADLINE
        values = nonzero_values()
        while not lib.watch_running() and time.monotonic() < deadline:
            write(next(values))
        while lib.watch_changes() < ENOUGH_CHANGES and time.monotonic() < deadline:
            for value in itertools.islice(values, 1000):
                write(value)
    finally:
        lib.watch_stop()
    return int(lib.watch_zeros()), int(lib.watch_changes())


def make_queue(mem: GuestMemory) -> Queue:
    q = Queue(QUEUE_SIZE)
    q.desc_table, q.avail_ring, q.used_ring = DESC, AVAIL, USED
    q.ready = True
    return q


def test_used_idx_and_avail_event_change_in_one_store(watcher: ctypes.CDLL) -> None:
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    try:
        # The watcher can catch the zero that struct.pack_into leaves for an instant.
        zeros, changes = zeros_seen(
            watcher, mem, USED_IDX, lambda v: struct.pack_into("<H", mem.view(USED, 8), 2, v)
        )
        if zeros == 0:
            pytest.skip(
                f"the watcher saw {changes} changes and no torn write of struct.pack_into: "
                "it cannot tell a single store from two here"
            )

        q = make_queue(mem)

        def add_used(value: int) -> None:
            q.next_used = (value - 1) & 0xFFFF  # add_used publishes next_used + 1 == value
            q.add_used(mem, value % QUEUE_SIZE, 0)

        zeros, changes = zeros_seen(watcher, mem, USED_IDX, add_used)
        assert changes > 0, "the watcher never saw the used idx change"
        assert zeros == 0, f"a driver polling the used idx saw 0 {zeros} times in {changes}"

        q.event_idx = True

        def publish_avail_event(value: int) -> None:
            q.next_avail = value
            mem.write_u16(AVAIL + 2, value)  # nothing pending: no re-check work
            q.enable_notification(mem)

        zeros, changes = zeros_seen(watcher, mem, AVAIL_EVENT, publish_avail_event)
        assert changes > 0, "the watcher never saw avail_event change"
        assert zeros == 0, f"a driver reading avail_event saw 0 {zeros} times in {changes}"
    finally:
        mem.close()
