"""A request storm against a running guest (the built-in guest on strato's real builder, with
real devices): thousands of requests from concurrent clients, good and bad, slow and half-open.
The guest keeps running and still answers the power button afterwards, every answer is right,
the VMM's memory and connection count stay bounded."""

from __future__ import annotations

import json
import random
import socket
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from strato.api import Limits
from strato.vmm.stop import StopReason
from strato.vmm.vm import VmState
from tests.api.helpers import (
    KVM,
    POWER_PASS,
    READY_POWER,
    ApiEnv,
    connect,
    poll,
    read_response,
    state,
)

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not KVM, reason="needs /dev/kvm")]

CLIENTS = 12
REQUESTS_PER_CLIENT = 300

# (request, expected status)
MIX: list[tuple[bytes, int]] = [
    (b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n", 200),
    (b"GET /api/v1/vm.info HTTP/1.1\r\n\r\n", 200),
    (b"GET /api/v1/vm.counters HTTP/1.1\r\n\r\n", 200),
    (b"GET /api/v1/vm.nothing HTTP/1.1\r\n\r\n", 404),
    (b"PUT /api/v1/vm.info HTTP/1.1\r\n\r\n", 405),
    (b"PUT /api/v1/vm.boot HTTP/1.1\r\n\r\n", 500),  # already booted
    (b"PUT /api/v1/vm.resume HTTP/1.1\r\n\r\n", 500),  # not paused
    (b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 9\r\n\r\n{invalid}", 400),
    (b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 501),
]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def running(make_env: Callable[..., ApiEnv]) -> ApiEnv:
    env = make_env(limits=Limits(request_timeout=1.0, idle_timeout=1.0, write_timeout=1.0))
    env.client.create(env.config_json())
    env.client.boot()
    env.wait_serial(READY_POWER)  # the guest now waits for the power button
    return env


def storm(env: ApiEnv, seed: int) -> Counter[str]:
    """Run the clients and the nasty ones; returns what went wrong, by kind."""
    problems: Counter[str] = Counter()
    lock = threading.Lock()

    def note(kind: str) -> None:
        with lock:
            problems[kind] += 1

    def client(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        s: socket.socket | None = None
        try:
            for i in range(REQUESTS_PER_CLIENT):
                if s is None or i % 50 == 0:  # keep-alive, with fresh connections now and then
                    if s is not None:
                        s.close()
                    s = connect(env.path)
                request, expected = rng.choice(MIX)
                s.sendall(request)
                r = read_response(s)
                if r.status != expected:
                    note(f"status {r.status} for {request[:30]!r}, expected {expected}")
                if r.status >= 400 and not isinstance(json.loads(r.body), list):
                    note("error body is not a list")
        except Exception as e:
            note(f"client error {type(e).__name__}: {e}")
        finally:
            if s is not None:
                s.close()

    def nasty(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        for _ in range(30):
            try:
                s = connect(env.path, timeout=5)
                kind = rng.randrange(4)
                if kind == 0:  # half-open: connect and leave
                    pass
                elif kind == 1:  # garbage
                    s.sendall(bytes(rng.randrange(256) for _ in range(200)) + b"\r\n\r\n")
                elif kind == 2:  # a huge announced body
                    s.sendall(
                        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n"
                    )
                else:  # a head that never ends
                    s.sendall(b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Slow: yes")
                s.close()
            except OSError as e:
                note(f"nasty client could not connect: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    threads += [threading.Thread(target=nasty, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a storm client hung"
    return problems


def test_request_storm_keeps_the_guest_running(running: ApiEnv) -> None:
    env = running
    vm = env.vm
    threads_before = threading.active_count()
    storm(env, seed=1)  # warm-up: allocator pools, caches
    rss_before = rss_bytes()
    served_before = env.server.requests_served
    problems = storm(env, seed=2)
    assert not problems, problems

    served = env.server.requests_served - served_before
    assert (
        served >= CLIENTS * REQUESTS_PER_CLIENT * 0.5
    )  # the rest are answered by the server alone
    # The same VM ran all along: nothing stopped, rebuilt or paused it.
    assert env.client.info()["state"] == "Running"
    assert env.vm is vm and vm.state is VmState.RUNNING and vm.stop_result is None
    assert all(v._thread is not None and v._thread.is_alive() for v in vm.vcpus)
    # Bounded: connections are closed, threads are back, memory did not grow with requests.
    assert poll(lambda: env.server.open_connections <= 1, timeout=5)
    assert env.server.peak_connections <= env.server.limits.max_connections
    assert threading.active_count() <= threads_before
    grown = rss_bytes() - rss_before
    assert grown < 32 << 20, f"RSS grew by {grown >> 20} MiB during the storm"
    # The guest is alive and responsive: it sees the power button and powers off.
    env.client.power_button()
    assert poll(lambda: state(env) == "Shutdown", timeout=30), env.serial()
    assert POWER_PASS in env.serial()
    assert env.controller.guest_stop is not None
    assert env.controller.guest_stop.reason is StopReason.POWEROFF
