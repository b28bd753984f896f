"""One thread per vCPU running KVM_RUN, with pause/resume and a kick signal.

A vCPU sitting in KVM_RUN only comes back when the guest exits or a signal arrives. To pause
or stop, strato sets `immediate_exit` (so a KVM_RUN that starts after the request returns at
once) and sends the thread a real-time signal (so one already running returns with EINTR).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import signal
import struct
import threading
from collections.abc import Callable

from strato._sys.ioctl import SysError, raw_ioctl
from strato.bus import Bus
from strato.kvm import VcpuFd
from strato.kvm import bindings as b
from strato.kvm import ioctls as k
from strato.vmm.exit_handler import handle_exit
from strato.vmm.stop import Stop, StopReason

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGRTMIN

# struct kvm_run offsets and formats for the hot path (the typed decoder is VcpuFd.decode_exit)
_U32 = struct.Struct("<I")
_IO = struct.Struct("<BBHIQ")
_MMIO = struct.Struct("<Q8sIB")
_EXIT_REASON = b.KVM_RUN_EXIT_REASON
_IMMEDIATE_EXIT = b.KVM_RUN_IMMEDIATE_EXIT
_UNION = b.KVM_RUN_EXIT_UNION
_MMIO_DATA = _UNION + 8
_EXIT_IO, _EXIT_MMIO, _IO_OUT = k.KVM_EXIT_IO, k.KVM_EXIT_MMIO, k.KVM_EXIT_IO_OUT
KVM_RUN = k.KVM_RUN
_kick_installed = False


def install_kick_handler() -> bool:
    """Install a no-op handler for the kick signal (only possible on the main thread)."""
    global _kick_installed
    if _kick_installed:
        return True
    try:
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    except ValueError:
        log.warning("not on the main thread: vCPUs in KVM_RUN cannot be kicked; pausing waits")
        return False
    signal.siginterrupt(KICK_SIGNAL, True)
    _kick_installed = True
    return True


class Vcpu:
    def __init__(
        self,
        fd: VcpuFd,
        pio: Bus,
        mmio: Bus,
        on_stop: Callable[[Stop], None],
        on_thread_start: Callable[[], None] | None = None,
    ) -> None:
        self.fd = fd
        self.id = fd.id
        self.pio = pio
        self.mmio = mmio
        self._on_stop = on_stop
        self._on_thread_start = on_thread_start
        self._thread: threading.Thread | None = None
        self._lock = threading.Condition()
        self._pause_requested = False
        self._paused = False
        self._stop_requested = False
        self.exits = 0

    # -- control (any thread) -------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"vcpu{self.id}", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self.fd.set_immediate_exit(True)
        t = self._thread
        # Without our handler the signal's default action would end the whole process.
        if _kick_installed and t is not None and t.ident is not None and t.is_alive():
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def request_stop(self) -> None:
        with self._lock:
            self._stop_requested = True
            self._lock.notify_all()
        self.kick()

    def pause(self, timeout: float = 5.0) -> bool:
        """Ask the vCPU to park outside KVM_RUN and wait until it has."""
        with self._lock:
            self._pause_requested = True
        self.kick()
        with self._lock:
            return self._lock.wait_for(
                lambda: self._paused or self._thread is None or not self._thread.is_alive(),
                timeout,
            )

    def resume(self) -> None:
        with self._lock:
            self._pause_requested = False
            self._lock.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def paused(self) -> bool:
        return self._paused

    # -- the vCPU thread ------------------------------------------------------------------------
    def _park(self) -> None:
        with self._lock:
            self._paused = True
            self._lock.notify_all()
            self._lock.wait_for(lambda: not self._pause_requested or self._stop_requested)
            self._paused = False
            self._lock.notify_all()

    def _run(self) -> None:
        if self._on_thread_start is not None:
            self._on_thread_start()
        stop: Stop | None = None
        try:
            stop = self._loop()
        except Exception as e:  # a device or KVM failure must end the VM with a message
            log.exception("vCPU %d failed", self.id)
            stop = Stop(StopReason.VMM_ERROR, f"vCPU {self.id}: {e}", self.id)
        if stop is not None:
            self._on_stop(stop)

    def _loop(self) -> Stop | None:
        """KVM_RUN until the VM stops. Hot path: single port and MMIO accesses that hit a
        device are decoded from kvm_run in place and dispatched here; everything else goes
        through the typed exits and `handle_exit` (bench/exits.py measures this loop)."""
        fd, pio, mmio = self.fd, self.pio, self.mmio
        run_map = fd.run_map
        vcpu_fd = fd.fd
        pio_lookup, mmio_lookup = pio.lookup, mmio.lookup
        u32, io_head, mmio_head = _U32.unpack_from, _IO.unpack_from, _MMIO.unpack_from
        kvm_run, ioctl = KVM_RUN, raw_ioctl
        while True:
            if self._pause_requested:
                self._park()
            if self._stop_requested:
                return None
            if run_map[_IMMEDIATE_EXIT]:
                run_map[_IMMEDIATE_EXIT] = 0
                continue  # re-check the requests that came with the kick
            if ioctl(vcpu_fd, kvm_run, 0) < 0:
                err = ctypes.get_errno()
                if err in (errno.EINTR, errno.EAGAIN):
                    continue
                raise SysError(err, "KVM_RUN")
            self.exits += 1
            reason = u32(run_map, _EXIT_REASON)[0]
            if reason == _EXIT_IO:
                direction, size, port, count, off = io_head(run_map, _UNION)
                if count == 1:
                    hit = pio_lookup(port)
                    if hit is not None:
                        if direction == _IO_OUT:
                            hit[0].write(hit[1], run_map[off : off + size])
                        else:
                            run_map[off : off + size] = hit[0].read(hit[1], size)
                        continue
            elif reason == _EXIT_MMIO:
                addr, data, length, is_write = mmio_head(run_map, _UNION)
                hit = mmio_lookup(addr)
                if hit is not None and 0 < length <= 8:
                    if is_write:
                        hit[0].write(hit[1], data[:length])
                    else:
                        run_map[_MMIO_DATA : _MMIO_DATA + length] = hit[0].read(hit[1], length)
                    continue
            stop = handle_exit(fd.decode_exit(), fd, pio, mmio)
            if stop is not None:
                return stop


if threading.current_thread() is threading.main_thread():
    # Install at import where we can, so a VM later run from a worker thread can be kicked.
    install_kick_handler()
