"""5. Network: guest -> tap and tap -> guest through virtio-net (userspace, no vhost), as root.

- guest -> tap: the built-in guest's `net-tx` keeps its transmit ring full of `size`-byte
  frames for `seconds`; the frames land on a fresh tap (counted by the tap's rx_packets).
- tap -> guest: `net-rx`; after its READY line this process floods the tap with frames of one
  size from an AF_PACKET socket (as tests/guest/hostnet.py sends them) until the guest's
  BENCH-END; the guest counts what it received in its timed window. Frames the guest could not
  take in time are dropped by the tap (tx_dropped), as on a real overloaded link.

Frame sizes: 64 and 1500 bytes (Ethernet header included). TSO-sized frames are not measured:
the built-in guest sends no GSO frames, and only offers checksum offload on receive.
Reported: frames/s and Gbit/s from the guest's TSC timing, and the VMM's CPU per frame.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from bench.common import Result, Results, Vm, alternate, builtin_guest, log, quiet_env
from bench.vmrun import RunState, run_vmm
from tests.guest.harness import BenchEnd, Event, Ready
from tests.guest.hostnet import ETH_P_ALL, TapDevice, can_make_taps, rx_test_frame

SIZES = (64, 1500)
TAP = "stbench0"


def tap_counter(name: str, counter: str) -> int:
    try:
        return int(Path(f"/sys/class/net/{name}/statistics/{counter}").read_text())
    except (OSError, ValueError):
        return 0


class Flood:
    """Sends one frame over and over on an interface from a thread, until stopped."""

    def __init__(self, ifname: str, frame: bytes) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))
        self.frame = frame
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def start(self) -> Flood:
        self._thread.start()
        return self

    def _run(self) -> None:
        send, frame, stop = self.sock.send, self.frame, self._stop
        n = 0
        while not stop.is_set():
            for _ in range(64):
                try:
                    send(frame)
                    n += 1
                except OSError:  # ENOBUFS: the qdisc is full; try again
                    break
        self.sent = n

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def run(results: Results, runs: int, seconds: int = 3) -> None:
    if not can_make_taps():
        log("network: skipped (needs root, /dev/net/tun and `ip`)")
        results.details["network"] = "skipped: needs root, /dev/net/tun and ip"
        return
    elf = builtin_guest()
    words = [f"bench=net-tx,size={s},seconds={seconds}" for s in SIZES]
    words += [f"bench=net-rx,seconds={seconds}" for _ in SIZES]
    mac = "52:54:00:12:34:56"
    vm = Vm(elf, cmdline=" ".join(words), memory_mib=256, tap=TAP, mac=mac)
    env = quiet_env()
    keys = [("tx", s) for s in SIZES] + [("rx", s) for s in SIZES]
    fps: dict[tuple[str, int], dict[str, list[float]]] = {
        k: {"strato": [], "qemu": []} for k in keys
    }
    gbps: dict[tuple[str, int], dict[str, list[float]]] = {
        k: {"strato": [], "qemu": []} for k in keys
    }
    cpu: dict[tuple[str, int], dict[str, list[float]]] = {
        k: {"strato": [], "qemu": []} for k in keys
    }
    seen: dict[str, list[int]] = {"strato": [], "qemu": []}

    def once(vmm: str, i: int) -> None:
        rx_sizes = list(SIZES)
        flood: list[Flood] = []

        def on_event(event: Event, state: RunState) -> None:
            if isinstance(event, Ready) and event.what == "net-rx-bench":
                size = rx_sizes.pop(0)
                frame = rx_test_frame(event.fields["mac"], 0, size, tag="RXB")
                flood.append(Flood(TAP, frame).start())
            elif isinstance(event, BenchEnd) and event.name == "net-rx" and flood:
                flood[-1].stop()

        with TapDevice(TAP):
            rx0 = tap_counter(TAP, "rx_packets")
            try:
                r = run_vmm(vm.command(vmm), timeout=120 + 4 * seconds, on_event=on_event, env=env)
            finally:
                for f in flood:
                    f.stop()
            seen[vmm].append(tap_counter(TAP, "rx_packets") - rx0)
        for j, key in enumerate(keys):
            direction = key[0]
            w = r.window(f"net-{direction}", j % len(SIZES))
            secs = w.guest_seconds
            fps[key][vmm].append(w.ops / secs if secs else 0.0)
            gbps[key][vmm].append(w.bytes * 8 / secs / 1e9 if secs else 0.0)
            if w.cpu_seconds is not None and w.ops:
                cpu[key][vmm].append(w.cpu_seconds / w.ops * 1e6)

    log(f"network: {runs} alternated runs, tx and rx at {SIZES} bytes, {seconds} s each")
    alternate(runs, once)
    for key in keys:
        direction, size = key
        case = f"{'guest->tap' if direction == 'tx' else 'tap->guest'} {size}B"
        for metric, unit, values, better in (
            ("frames/s", "frames/s", fps, "higher"),
            ("Gbit/s", "Gbit/s", gbps, "higher"),
            ("VMM CPU per frame", "us", cpu, "lower"),
        ):
            results.add(
                Result(
                    "network",
                    case,
                    metric,
                    unit,
                    better,
                    strato=values[key]["strato"],
                    qemu=values[key]["qemu"],
                    goal="at least QEMU" if better == "higher" else "",
                )
            )
    results.details["network_tap_rx_packets"] = seen
