"""`strato --net tap=NAME` for a tap that does not exist (issue 10): strato creates it, as
Cloud Hypervisor does, under its seccomp filters (the `strato` command, confined).

The built-in guest runs its network checks (`net-tx`, `net-csum`, `net-rx`, `net-mq` on two
queue pairs) on the tap strato made, then resets (`reboot`); strato boots it again, the tap is
made again, and the checks pass again. At each boot's `READY net-rx` the test looks at the tap
from inside the namespace: up, with the address, netmask and MAC asked for, and the guest's
frames of `net-tx` counted by the kernel (a tap that is down fails them with EIO). After strato
exits the tap is gone (not persistent). Everything runs in a network namespace the test
creates and deletes: no frame leaves it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from strato.vmm.stop import EXIT_CONFIG_ERROR
from tests.guest.harness import HostResponder, Ready, run_guest
from tests.guest.hostnet import ETH_P_ALL
from tests.guest.test_strato_guest import mq_answer_frames

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.root,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
        reason="needs root, /dev/net/tun and ip(8)",
    ),
    pytest.mark.timeout(180),
]

CLONE_NEWNET = 0x40000000
TAP = "stnew0"
IP, MASK, PREFIX = "10.77.9.1", "255.255.255.0", 24
HOST_MAC, GUEST_MAC = "02:00:00:77:09:01", "52:54:00:77:09:02"
NET_CHECKS = ["net-tx", "net-csum", "net-rx", "net-mq"]


def strato(ns: str, *args: str, prefix: tuple[str, ...] = ()) -> list[str]:
    return ["ip", "netns", "exec", ns, *prefix, sys.executable, "-m", "strato.cli.main", *args]


def link(ns: str, name: str) -> dict[str, Any] | None:
    p = subprocess.run(
        ["ip", "netns", "exec", ns, "ip", "-j", "-s", "addr", "show", "dev", name],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        return None
    found: dict[str, Any] = json.loads(p.stdout)[0]
    return found


def packet_socket(ns: str, ifname: str) -> socket.socket:
    """A raw socket on `ifname` of namespace `ns`: made on a thread that joined the
    namespace (setns is per thread), usable from any thread afterwards."""
    made: list[socket.socket | BaseException] = []

    def join_and_make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.bind((ifname, 0))
            made.append(sock)
        except BaseException as e:
            made.append(e)

    t = threading.Thread(target=join_and_make)  # ends in the namespace: a thread of its own
    t.start()
    t.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def test_a_missing_tap_is_created_configured_kept_working_across_a_reboot_and_removed(
    guest_elf: Path, workdir: Path, netns: str
) -> None:
    disk = workdir / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    assert link(netns, TAP) is None
    seen: list[dict[str, Any]] = []
    sockets: list[socket.socket] = []

    def send(frame: bytes) -> None:
        sockets[-1].send(frame)

    responder = HostResponder(send_frame=send)

    def on_net_rx(ready: Ready) -> None:
        state = link(netns, TAP)
        assert state is not None, "the tap is missing while strato runs"
        seen.append(state)
        sockets.append(packet_socket(netns, TAP))  # a new tap on every boot
        responder.net_rx(ready)

    def on_net_mq(ready: Ready) -> None:
        for frame in mq_answer_frames(ready):
            send(frame)

    net = f"tap={TAP},ip={IP},mask={MASK},host_mac={HOST_MAC},mac={GUEST_MAC},num_queues=4"
    argv = strato(
        netns,
        "--kernel", str(guest_elf), "--memory", "size=64M",
        "--cmdline", f"tests={','.join(NET_CHECKS)},reboot host=1 host-timeout=5000",
        "--disk", f"path={disk},serial=tapnew", "--console", "off", "--serial", "tty",
        "--net", net,
    )  # fmt: skip
    try:
        result = run_guest(argv, timeout=120, on_ready={"net-rx": on_net_rx, "net-mq": on_net_mq})
    finally:
        for s in sockets:
            s.close()
    out = result.output
    assert result.returncode == 0, result.stderr + out.text()
    assert not out.failures(), out.text()
    for check in [*NET_CHECKS, "reboot"]:
        assert len([t for t in out.named(check) if t.passed]) == 2, (check, out.text())
    assert "Input/output error" not in result.stderr
    assert len(seen) == 2  # one look per boot
    # As Cloud Hypervisor: the tap goes with the VM's devices and the reboot makes a new one.
    assert seen[0]["ifindex"] != seen[1]["ifindex"]
    for state in seen:
        assert "UP" in state["flags"], state
        assert state["address"] == HOST_MAC
        inet = [(a["local"], a["prefixlen"]) for a in state["addr_info"] if a["family"] == "inet"]
        assert inet == [(IP, PREFIX)]
        # The kernel took the guest's net-tx frames (8) and more (net-csum): none failed.
        assert state["stats64"]["rx"]["packets"] >= 9, state["stats64"]
    assert link(netns, TAP) is None  # not persistent: gone with strato


def test_a_net_without_tap_gets_a_new_vmtap_with_cloud_hypervisors_default_address(
    guest_elf: Path, netns: str
) -> None:
    seen: list[dict[str, Any] | None] = []
    sockets: list[socket.socket] = []

    def send(frame: bytes) -> None:
        sockets[-1].send(frame)

    responder = HostResponder(send_frame=send)

    def on_net_rx(ready: Ready) -> None:
        seen.append(link(netns, "vmtap0"))
        sockets.append(packet_socket(netns, "vmtap0"))
        responder.net_rx(ready)

    argv = strato(
        netns,
        "--kernel", str(guest_elf), "--memory", "size=64M",
        "--cmdline", "tests=net-tx,net-rx host=1 host-timeout=5000 end=poweroff",
        "--console", "off", "--serial", "tty", "--net", f"mac={GUEST_MAC}",
    )  # fmt: skip
    try:
        result = run_guest(argv, timeout=60, on_ready={"net-rx": on_net_rx})
    finally:
        for s in sockets:
            s.close()
    out = result.output
    assert result.returncode == 0, result.stderr + out.text()
    out.check(["net-tx", "net-rx"])
    (state,) = seen
    assert state is not None, "no vmtap0 while strato runs"
    assert "UP" in state["flags"]
    inet = [(a["local"], a["prefixlen"]) for a in state["addr_info"] if a["family"] == "inet"]
    assert inet == [("192.168.249.1", 24)]
    assert link(netns, "vmtap0") is None


@pytest.mark.parametrize(
    ("net", "prefix", "message"),
    [
        (
            "tap=stperm0",
            ("setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"),
            "strato: error: --net tap=stperm0: tap stperm0: does not exist and cannot be"
            " created: Operation not permitted (creating a tap needs CAP_NET_ADMIN; or create it"
            " first: `ip tuntap add dev stperm0 mode tap user $USER`)",
        ),
        (
            "tap=lo",
            (),
            "strato: error: --net tap=lo: tap lo: an interface of that name exists and is not a"
            " tap (TUNSETIFF: Invalid argument)",
        ),
    ],
)
def test_a_tap_that_cannot_be_made_stops_strato_at_start_up_with_the_reason(
    guest_elf: Path, netns: str, net: str, prefix: tuple[str, ...], message: str
) -> None:
    if prefix and shutil.which(prefix[0]) is None:
        pytest.skip(f"needs {prefix[0]}")
    argv = strato(
        netns, "--kernel", str(guest_elf), "--serial", "null", "--console", "off",
        "--net", net, prefix=prefix,
    )  # fmt: skip
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert p.returncode == EXIT_CONFIG_ERROR, p.stderr
    assert message in p.stderr, p.stderr
