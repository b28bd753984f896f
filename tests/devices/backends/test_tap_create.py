"""`open_tap` creates a missing tap as Cloud Hypervisor does (root only).

Every tap here lives in a network namespace the test creates and deletes (`strato-t-<random>`):
the code under test runs in a child started with `ip netns exec`, which prints what it saw
as JSON. No frame leaves the namespace.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from strato.devices.backends import netif
from strato.devices.backends.tap import TapError, open_tap

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
        reason="needs root, /dev/net/tun and ip(8)",
    ),
]

IFF_MULTI_QUEUE = 0x0100

# Run in the namespace: `report(**values)` prints them for the test; `link(name)` is
# `ip -j addr show` of the interface (None when there is none).
PRELUDE = """
import json, subprocess, sys
from strato.devices.backends import netif
from strato.devices.backends.tap import TapError, open_tap

def report(**values):
    print(json.dumps(values), flush=True)

def link(name):
    p = subprocess.run(["ip", "-j", "addr", "show", "dev", name], capture_output=True, text=True)
    return json.loads(p.stdout)[0] if p.returncode == 0 else None
"""


def in_ns(ns: str, code: str, *, prefix: list[str] | None = None) -> list[dict[str, Any]]:
    """Run PRELUDE + `code` in namespace `ns`; the values it reported, in order."""
    argv = ["ip", "netns", "exec", ns, *(prefix or []), sys.executable, "-c"]
    p = subprocess.run(
        [*argv, PRELUDE + textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines()]


def ipv4(link: dict[str, Any]) -> list[str]:
    return [f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"]


def test_a_created_tap_is_up_with_the_address_mask_mac_and_mtu_asked_for_and_goes_away(
    netns: str,
) -> None:
    before, during, after = in_ns(
        netns,
        """
        report(link=link("stc0"))
        taps = open_tap("stc0", 1, ip="10.77.0.1", mask="255.255.255.128",
                        host_mac="02:11:22:33:44:55", mtu=1400)
        report(link=link("stc0"), names=[t.name for t in taps])
        for t in taps:
            t.close()
        report(link=link("stc0"))
        """,
    )
    assert before["link"] is None
    link = during["link"]
    assert during["names"] == ["stc0"]
    assert "UP" in link["flags"]
    assert ipv4(link) == ["10.77.0.1/25"]
    assert link["address"] == "02:11:22:33:44:55"
    assert link["mtu"] == 1400
    assert after["link"] is None  # not persistent: gone with its last fd


def test_the_defaults_of_cloud_hypervisor_and_a_generated_name(netns: str) -> None:
    (during,) = in_ns(
        netns,
        """
        taps = open_tap(None, 2, ip="192.168.249.1", mask="255.255.255.0")
        other = open_tap(None, 1)
        report(names=[t.name for t in taps], other=other[0].name,
               link=link(taps[0].name), other_link=link(other[0].name))
        """,
    )
    assert during["names"] == ["vmtap0", "vmtap0"]  # the kernel's first free vmtapN, both fds
    assert during["other"] == "vmtap1"
    assert ipv4(during["link"]) == ["192.168.249.1/24"]
    assert "UP" in during["link"]["flags"]
    assert ipv4(during["other_link"]) == []  # no ip given: none set
    assert "UP" in during["other_link"]["flags"]


def test_multiqueue_creation_opens_one_fd_per_pair_on_one_multi_queue_tap(netns: str) -> None:
    (during,) = in_ns(
        netns,
        """
        taps = open_tap("stmq0", 4, ip="10.77.1.1", mask="255.255.255.0")
        flags = int(open("/sys/class/net/stmq0/tun_flags").read(), 16)
        report(names=sorted({t.name for t in taps}), fds=len({t.fd for t in taps}),
               mq=[t.multi_queue for t in taps], flags=flags, link=link("stmq0"))
        """,
    )
    assert during["names"] == ["stmq0"]
    assert during["fds"] == 4
    assert during["mq"] == [True] * 4
    assert during["flags"] & IFF_MULTI_QUEUE
    assert ipv4(during["link"]) == ["10.77.1.1/24"]
    assert "UP" in during["link"]["flags"]


def test_an_existing_tap_keeps_its_address_and_is_brought_up(netns: str) -> None:
    def ip(*args: str) -> None:
        subprocess.run(["ip", "netns", "exec", netns, "ip", *args], check=True)

    ip("tuntap", "add", "dev", "stx0", "mode", "tap")
    ip("addr", "add", "10.77.2.1/24", "dev", "stx0")
    during, after = in_ns(
        netns,
        """
        taps = open_tap("stx0", 1, ip="10.77.3.1", mask="255.255.255.0")
        report(link=link("stx0"))
        for t in taps:
            t.close()
        report(link=link("stx0"))
        """,
    )
    assert ipv4(during["link"]) == ["10.77.2.1/24"]  # as Cloud Hypervisor: not overwritten
    assert "UP" in during["link"]["flags"]  # it was down; a down tap fails writes with EIO
    assert after["link"] is not None  # persistent (made by ip tuntap): still there


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ip": "10.77.4.300"}, "ip=10.77.4.300: not an IPv4 address"),
        ({"ip": "10.77.4.1", "mask": "255.0.255.0"}, "mask=255.0.255.0: not a netmask"),
        ({"host_mac": "02:11:22:33:44"}, "host_mac=02:11:22:33:44: not a MAC address"),
    ],
)
def test_a_bad_setting_fails_naming_it_and_leaves_no_tap(
    netns: str, kwargs: dict[str, str], message: str
) -> None:
    (result,) = in_ns(
        netns,
        f"""
        try:
            open_tap("stbad0", 1, **{kwargs!r})
        except TapError as e:
            report(errno=e.errno, error=e.strerror, link=link("stbad0"))
        """,
    )
    assert result["errno"] == errno.EINVAL
    assert result["error"].startswith("tap stbad0: ")
    assert message in result["error"]
    assert result["link"] is None  # all or nothing: the tap made for it is gone


def test_a_name_too_long_for_ifnamsiz_is_refused_before_anything_is_opened() -> None:
    with pytest.raises(TapError) as info:
        open_tap("x" * 16, 1)
    assert info.value.errno == errno.EINVAL
    assert info.value.strerror == (
        "tap 'xxxxxxxxxxxxxxxx': not a valid interface name (1 to 15 bytes, no '/')"
    )


def test_the_name_of_an_interface_that_is_no_tap_is_refused(netns: str) -> None:
    (result,) = in_ns(
        netns,
        """
        try:
            open_tap("lo", 1)
        except TapError as e:
            report(errno=e.errno, error=e.strerror, up=netif.is_up("lo"))
        """,
    )
    assert result["errno"] == errno.EINVAL
    assert result["error"] == (
        "tap lo: an interface of that name exists and is not a tap (TUNSETIFF: Invalid argument)"
    )
    assert result["up"] is False  # left as it was


def test_creating_a_tap_without_cap_net_admin_names_the_tap_and_the_cause(netns: str) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv(1)")
    drop = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"]
    (result,) = in_ns(
        netns,
        """
        try:
            open_tap("stperm0", 1)
        except TapError as e:
            report(errno=e.errno, error=e.strerror, link=link("stperm0"))
        """,
        prefix=drop,
    )
    assert result["errno"] == errno.EPERM
    assert result["error"] == (
        "tap stperm0: does not exist and cannot be created: Operation not permitted (creating"
        " a tap needs CAP_NET_ADMIN; or create it first:"
        " `ip tuntap add dev stperm0 mode tap user $USER`)"
    )
    assert result["link"] is None


def test_netmask_check_takes_ones_then_zeros_only() -> None:
    for good in ("255.255.255.0", "255.255.255.255", "0.0.0.0", "255.255.128.0"):
        netif.check_netmask(netif.parse_ipv4(good, "mask"))
    for bad in ("255.0.255.0", "0.255.255.255", "255.255.255.1"):
        with pytest.raises(netif.NetifError):
            netif.check_netmask(netif.parse_ipv4(bad, "mask"))
