"""The API server over a real unix socket (VMs from strato's real builder; most cases need
none): protocol, limits, negative cases.

Every negative case checks the status, that the body is Cloud Hypervisor's error array, and
that the server still answers afterwards."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from strato.api import ApiClient, ApiError, Limits, serve_api
from strato.api.routes import ENDPOINTS
from strato.vmm.config import ConfigError
from strato.vmm.controller import VmmController
from tests.api.helpers import (
    ApiEnv,
    closed_by_peer,
    connect,
    exchange,
    poll,
    read_response,
    short_dir,
)


def put(endpoint: str, body: bytes | None = None, extra: str = "") -> bytes:
    head = f"PUT /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n{extra}"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + (body or b"")


def get(endpoint: str, extra: str = "") -> bytes:
    return f"GET /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode()


def create_body(env: ApiEnv, **extra: Any) -> bytes:
    return json.dumps(env.config_json(**extra)).encode()


def assert_alive(env: ApiEnv) -> None:
    assert env.client.ping()["version"]


# -- the happy path, the way ch-remote and Go clients talk -------------------------------------


def test_ch_remote_style_request(api_env: ApiEnv) -> None:
    """ch-remote's api_client: no Content-Type, reads the head, then Content-Length bytes."""
    env = api_env
    r = exchange(
        env.path, b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"
    )
    assert r.status == 200
    assert r.headers["content-type"] == "application/json"
    ping = r.json()
    assert set(ping) == {"build_version", "version", "pid", "features"}
    assert ping["pid"] == os.getpid()
    body = create_body(env)
    r = exchange(env.path, put("vm.create", body))
    assert r.status == 204 and r.body == b"" and "content-length" not in r.headers


def test_keep_alive_and_pipelining(api_env: ApiEnv) -> None:
    env = api_env
    with connect(env.path) as s:
        s.sendall(get("vmm.ping") * 5 + get("vm.info"))
        statuses = [read_response(s).status for _ in range(6)]
        assert statuses == [200] * 5 + [404]
        s.sendall(get("vmm.ping"))
        assert read_response(s).status == 200


def test_http10_closes_unless_keep_alive(api_env: ApiEnv) -> None:
    env = api_env
    with connect(env.path) as s:
        s.sendall(b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n")
        r = read_response(s)
        assert r.status == 200 and r.headers["connection"] == "close"
        assert closed_by_peer(s)
    with connect(env.path) as s:
        s.sendall(b"GET /api/v1/vmm.ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert read_response(s).headers["connection"] == "keep-alive"
        s.sendall(b"GET /api/v1/vmm.ping HTTP/1.0\r\nConnection: close\r\n\r\n")
        assert read_response(s).status == 200
        assert closed_by_peer(s)


def test_expect_100_continue(api_env: ApiEnv) -> None:
    env = api_env
    body = create_body(env)
    with connect(env.path) as s:
        s.sendall(
            put("vm.create", None, f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n")
        )
        assert read_response(s).status == 100
        s.sendall(body)
        assert read_response(s).status == 204


def test_absolute_form_target_and_query_are_accepted(api_env: ApiEnv) -> None:
    env = api_env
    r = exchange(env.path, b"GET http://localhost/api/v1/vmm.ping?x=1 HTTP/1.1\r\n\r\n")
    assert r.status == 200


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_fd_listener(sock_dir: Path) -> None:
    d = sock_dir
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(d / "fd.sock"))
    controller = VmmController()
    controller.start()
    server = serve_api(controller, sock.detach())
    try:
        with ApiClient(d / "fd.sock") as api:
            assert api.ping()["features"] == ["kvm"]
    finally:
        server.close()
        controller.close()


def test_socket_path_in_use_is_refused(api_env: ApiEnv) -> None:
    env = api_env
    with pytest.raises(ConfigError, match="in use"):
        serve_api(env.controller, env.path)
    assert_alive(env)


def test_stale_socket_is_replaced_and_removed_on_close(sock_dir: Path) -> None:
    d = sock_dir
    path = d / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file left by a crashed VMM
    controller = VmmController()
    controller.start()
    server = serve_api(controller, path)
    with ApiClient(path) as api:
        api.ping()
    server.close()
    controller.close()
    assert not path.exists() and not (d / "api.sock.lock").exists()


# -- negative cases ----------------------------------------------------------------------------
# (name, request bytes, expected status, words in the error messages); the connection is kept


def _negatives() -> list[tuple[str, Callable[[ApiEnv], bytes], int, str]]:
    cases: list[tuple[str, Callable[[ApiEnv], bytes], int, str]] = [
        ("unknown endpoint", lambda e: get("vm.frobnicate"), 404, "no endpoint"),
        ("no api root", lambda e: b"GET /vmm.ping HTTP/1.1\r\n\r\n", 404, "Not Found"),
        ("api v2", lambda e: b"GET /api/v2/vmm.ping HTTP/1.1\r\n\r\n", 404, "Not Found"),
        ("trailing slash", lambda e: get("vmm.ping/"), 404, "Not Found"),
        ("case matters", lambda e: get("VMM.PING"), 404, "Not Found"),
        ("root", lambda e: b"GET / HTTP/1.1\r\n\r\n", 404, "Not Found"),
        ("put ping", lambda e: put("vmm.ping"), 405, "takes GET"),
        ("get create", lambda e: get("vm.create"), 405, "takes PUT"),
        ("post boot", lambda e: b"POST /api/v1/vm.boot HTTP/1.1\r\n\r\n", 405, "takes PUT"),
        ("delete info", lambda e: b"DELETE /api/v1/vm.info HTTP/1.1\r\n\r\n", 405, "takes GET"),
        ("head ping", lambda e: b"HEAD /api/v1/vmm.ping HTTP/1.1\r\n\r\n", 405, "takes GET"),
        ("get pause", lambda e: get("vm.pause"), 405, "takes PUT"),
        ("create without body", lambda e: put("vm.create"), 400, "needs a request body"),
        ("create empty body", lambda e: put("vm.create", b""), 400, "needs a request body"),
        ("create not json", lambda e: put("vm.create", b"{payload"), 400, "Failed to deserialize"),
        ("create truncated json", lambda e: put("vm.create", b'{"payload": {'), 400, "line 1"),
        ("create json array", lambda e: put("vm.create", b"[]"), 400, "expected an object"),
        ("create json string", lambda e: put("vm.create", b'"vm"'), 400, "expected an object"),
        ("create null", lambda e: put("vm.create", b"null"), 400, "expected an object"),
        ("create NaN", lambda e: put("vm.create", b'{"payload": {}, "x": NaN}'), 400, "NaN"),
        (
            "create duplicate key",
            lambda e: put("vm.create", b'{"payload": {}, "payload": {}}'),
            400,
            "duplicate field",
        ),
        (
            "create not utf-8",
            lambda e: put("vm.create", b'{"payload": {"kernel": "\xff"}}'),
            400,
            "not UTF-8",
        ),
        ("create deep nesting", lambda e: put("vm.create", b"[" * 100000), 400, "nested"),
        (
            "create huge int",
            lambda e: put("vm.create", b'{"memory": {"size": ' + b"9" * 5000 + b"}}"),
            400,
            "Failed to deserialize",
        ),
        (
            "create unknown field",
            lambda e: put("vm.create", create_body(e, frobnicate=1)),
            400,
            "unknown field `frobnicate`",
        ),
        (
            "create wrong type",
            lambda e: put("vm.create", create_body(e, cpus={"boot_vcpus": "1", "max_vcpus": 1})),
            400,
            "cpus.boot_vcpus",
        ),
        (
            "create no payload",
            lambda e: put("vm.create", b'{"cpus": {"boot_vcpus": 1, "max_vcpus": 1}}'),
            400,
            "payload: missing field",
        ),
        (
            "create missing kernel file",
            lambda e: put("vm.create", b'{"payload": {"kernel": "/nonexistent/vmlinux"}}'),
            400,
            "no such file",
        ),
        (
            "create too small memory",
            lambda e: put("vm.create", create_body(e, memory={"size": 4096})),
            400,
            "memory.size",
        ),
        (
            "create unsupported device",
            lambda e: put("vm.create", create_body(e, vsock={"cid": 3, "socket": "/s"})),
            400,
            "vsock",
        ),
        ("body on boot", lambda e: put("vm.boot", b"{}"), 400, "takes no request body"),
        (
            "body on get",
            lambda e: get("vm.info", "Content-Length: 2\r\n") + b"{}",
            400,
            "takes no request body",
        ),
        ("body on nmi", lambda e: put("vm.nmi", b"{}"), 400, "takes no request body"),
        ("info before create", lambda e: get("vm.info"), 404, "VM is not created"),
        ("boot before create", lambda e: put("vm.boot"), 404, "VM config is missing"),
        ("pause before create", lambda e: put("vm.pause"), 500, "VM is not running"),
        ("resume before create", lambda e: put("vm.resume"), 500, "VM is not running"),
        ("shutdown before create", lambda e: put("vm.shutdown"), 500, "VM is not running"),
        ("reboot before create", lambda e: put("vm.reboot"), 404, "VM is not created"),
        ("power-button before create", lambda e: put("vm.power-button"), 500, "not running"),
        ("counters before create", lambda e: get("vm.counters"), 500, "VM is not running"),
        (
            "snapshot",
            lambda e: put("vm.snapshot", b'{"destination_url": "file:///x"}'),
            501,
            "not implemented",
        ),
        ("add-disk", lambda e: put("vm.add-disk", b'{"path": "/x"}'), 501, "vm.add-disk"),
        ("resize", lambda e: put("vm.resize", b'{"desired_vcpus": 2}'), 501, "not implemented"),
        ("nmi", lambda e: put("vm.nmi"), 501, "not implemented"),
    ]
    for ep in ENDPOINTS:
        if ep.action is None and ep.name not in ("vm.nmi",):
            cases.append((f"later {ep.name}", lambda e, n=ep.name: put(n), 501, ep.name))
    return cases


NEGATIVE = _negatives()


@pytest.mark.parametrize(
    ("request_bytes", "status", "words"),
    [c[1:] for c in NEGATIVE],
    ids=[c[0] for c in NEGATIVE],
)
def test_negative_request(
    api_env: ApiEnv,
    request_bytes: Callable[[ApiEnv], bytes],
    status: int,
    words: str,
) -> None:
    env = api_env
    r = exchange(env.path, request_bytes(env))
    assert r.status == status, r.body
    messages = r.json()
    assert isinstance(messages, list) and all(isinstance(m, str) for m in messages)
    assert any(words in m for m in messages), messages
    if status == 405:
        assert r.headers["allow"] in ("GET", "PUT")
    assert_alive(env)


# (name, request bytes, expected status, words in the error messages): malformed HTTP; the
# connection is always closed.
MALFORMED: list[tuple[str, bytes, int, str]] = [
    (
        "garbage",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        400,
        "malformed request line",
    ),
    ("no version", b"GET /api/v1/vmm.ping\r\n\r\n", 400, "malformed request line"),
    ("extra space", b"GET  /api/v1/vmm.ping HTTP/1.1\r\n\r\n", 400, "malformed request line"),
    ("lowercase version", b"GET /api/v1/vmm.ping http/1.1\r\n\r\n", 400, "malformed HTTP version"),
    ("http/2", b"GET /api/v1/vmm.ping HTTP/2.0\r\n\r\n", 505, "only HTTP/1.0 and HTTP/1.1"),
    ("http/0.9 style", b"GET /api/v1/vmm.ping HTTP/0.9\r\n\r\n", 505, "only HTTP/1.0 and HTTP/1.1"),
    ("bad method", b"G(T /api/v1/vmm.ping HTTP/1.1\r\n\r\n", 400, "malformed method"),
    (
        "relative target",
        b"GET api/v1/vmm.ping HTTP/1.1\r\n\r\n",
        400,
        "the request target must be a path",
    ),
    (
        "non-ascii target",
        "GET /api/v1/vmm.pïng HTTP/1.1\r\n\r\n".encode(),
        400,
        "non-ASCII request target",
    ),
    (
        "header without colon",
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost localhost\r\n\r\n",
        400,
        "malformed header field",
    ),
    (
        "space before colon",
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost : x\r\n\r\n",
        400,
        "malformed header field",
    ),
    (
        "obs-fold",
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-A: 1\r\n  continued\r\n\r\n",
        400,
        "obsolete line folding",
    ),
    (
        "bad content-length",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
        400,
        "malformed Content-Length",
    ),
    (
        "negative content-length",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        400,
        "malformed Content-Length",
    ),
    (
        "conflicting content-length",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
        "conflicting Content-Length fields",
    ),
    (
        "chunked",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        501,
        "Transfer-Encoding is not supported",
    ),
    (
        "expect other",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 200-ok\r\nContent-Length: 2\r\n\r\n{}",
        417,
        "only 100-continue is supported",
    ),
    (
        "too large body",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
        413,
        "the body is limited to",
    ),
    (
        "too many headers",
        b"GET /api/v1/vmm.ping HTTP/1.1\r\n" + b"X-A: 1\r\n" * 100 + b"\r\n",
        431,
        "more than 64 fields",
    ),
    (
        "too large head",
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-A: " + b"a" * 20000 + b"\r\n\r\n",
        431,
        "Request Header Fields Too Large",
    ),
    ("empty request", b"\r\n\r\n\r\nGET", 408, "Request Timeout"),
]


@pytest.mark.parametrize(
    ("data", "status", "words"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_http(
    make_env: Callable[..., ApiEnv], data: bytes, status: int, words: str
) -> None:
    env = make_env(limits=Limits(request_timeout=0.5))
    with connect(env.path) as s:
        s.sendall(data)
        r = read_response(s)
        assert r.status == status, r.body
        messages = r.json()
        assert isinstance(messages, list) and any(words in m for m in messages), messages
        assert r.headers["connection"] == "close"
        assert closed_by_peer(s)
    assert_alive(env)


def test_oversized_body_with_content_length_under_limit_is_413(
    make_env: Callable[..., ApiEnv],
) -> None:
    env = make_env(limits=Limits(max_body_bytes=1000))
    r = exchange(env.path, put("vm.create", b"{" + b" " * 2000 + b"}"))
    assert r.status == 413
    assert r.json() == ["Payload Too Large", "the body is limited to 1000 bytes"]
    assert_alive(env)


# -- slow, silent and greedy clients -------------------------------------------------------------


def test_slow_request_times_out(make_env: Callable[..., ApiEnv]) -> None:
    env = make_env(limits=Limits(request_timeout=0.3))
    with connect(env.path) as s:
        s.sendall(b"GET /api/v1/vmm.ping HTTP/1.1\r\n")  # and never the end of the head
        r = read_response(s)
        assert r.status == 408 and r.json()[0] == "Request Timeout"
        assert closed_by_peer(s)
    with connect(env.path) as s:  # a body that never comes
        s.sendall(put("vm.create", None, "Content-Length: 100\r\n") + b"{")
        r = read_response(s)
        assert r.status == 408 and r.json()[0] == "Request Timeout"
    assert not any(f.exists() for f in env.serial_files)  # nothing was created
    assert_alive(env)


def test_dripping_client_times_out(make_env: Callable[..., ApiEnv]) -> None:
    """A byte now and then keeps a connection busy but does not extend the request deadline."""
    env = make_env(limits=Limits(request_timeout=0.5))
    data = b"GET /api/v1/vmm.ping HTTP/1.1\r\n" + b"X-Slow: " + b"a" * 1000
    with connect(env.path) as s:
        start = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for byte in data:
                s.send(bytes([byte]))
                time.sleep(0.01)
        assert time.monotonic() - start < 5


def test_idle_and_half_open_connections_are_closed(make_env: Callable[..., ApiEnv]) -> None:
    env = make_env(limits=Limits(idle_timeout=0.3))
    silent = connect(env.path)  # connects and says nothing
    half = connect(env.path)
    half.sendall(get("vmm.ping"))
    assert read_response(half).status == 200
    half.shutdown(socket.SHUT_WR)  # half-open: never reads or writes again
    assert closed_by_peer(silent) and closed_by_peer(half)
    assert poll(lambda: env.server.open_connections == 0)
    silent.close()
    half.close()
    assert_alive(env)


def test_client_that_never_reads_is_dropped(make_env: Callable[..., ApiEnv]) -> None:
    env = make_env(limits=Limits(write_timeout=0.3, request_timeout=30))
    s = connect(env.path)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # Pipelined requests whose answers pile up unread until the socket buffers are full.
    burst = get("vmm.ping") * 2000
    sent = 0
    s.settimeout(0.2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            sent += s.send(burst[sent % len(burst) :])
        except TimeoutError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            break
        if poll(lambda: env.server.open_connections == 0, timeout=0.05):
            break
    assert poll(lambda: env.server.open_connections == 0, timeout=5)
    s.close()
    assert_alive(env)


def test_connection_limit(make_env: Callable[..., ApiEnv]) -> None:
    """With every slot taken, new clients wait; idle connections are closed to make room."""
    env = make_env(limits=Limits(max_connections=4, evict_idle_after=0.2))
    idle = [connect(env.path) for _ in range(4)]
    assert poll(lambda: env.server.open_connections == 4)
    start = time.monotonic()
    assert_alive(env)  # waits in the backlog until an idle connection is closed
    assert time.monotonic() - start >= 0.15
    assert env.server.peak_connections == 4
    assert sum(closed_by_peer(s, timeout=0.5) for s in idle) >= 1
    for s in idle:
        s.close()


def test_busy_connections_are_never_evicted(make_env: Callable[..., ApiEnv]) -> None:
    env = make_env(limits=Limits(max_connections=2, evict_idle_after=0.05))
    assert env.builder is not None
    env.builder.release = release = threading.Event()  # the build waits for it
    env.client.create(env.config_json())
    booting = connect(env.path)
    booting.sendall(put("vm.boot"))  # the VMM thread is now busy in the builder
    pinging = connect(env.path)
    pinging.sendall(get("vmm.ping"))  # queued behind the boot
    assert poll(lambda: env.server.open_connections == 2)
    third = connect(env.path)
    third.sendall(get("vmm.ping"))
    time.sleep(0.3)  # slots stay taken: nothing may be evicted, the third waits
    assert env.server.connections_accepted == 3  # the client fixture's own connection, and two
    release.set()
    assert read_response(booting).status == 204
    assert read_response(pinging).status == 200
    assert read_response(third).status == 200
    assert env.client.info()["state"] == "Running" and len(env.builder.vms) == 1
    for s in (booting, pinging, third):
        s.close()


def test_client_leaving_during_a_request(api_env: ApiEnv) -> None:
    env = api_env
    for _ in range(20):
        s = connect(env.path)
        s.sendall(get("vm.info") + get("vmm.ping"))
        s.close()
    assert poll(lambda: env.server.open_connections <= 1)
    assert_alive(env)


def test_python_client_reconnects_after_server_closed_idle_connection(
    make_env: Callable[..., ApiEnv],
) -> None:
    env = make_env(limits=Limits(idle_timeout=0.2))
    env.client.ping()
    assert poll(lambda: env.server.open_connections == 0)
    assert env.client.ping()["version"]


def test_python_client_raises_api_error_with_messages(api_env: ApiEnv) -> None:
    env = api_env
    with pytest.raises(ApiError) as e:
        env.client.pause()
    assert e.value.status == 500
    assert e.value.messages[:2] == ["Error from API", "The VM could not be paused"]
    assert "not created" in e.value.messages[2]


def test_concurrent_clients(api_env: ApiEnv) -> None:
    env = api_env
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with ApiClient(env.path) as api:
                for _ in range(50):
                    api.ping()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert env.server.requests_served >= 400
