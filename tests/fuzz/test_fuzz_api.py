"""Fuzz targets "api-http" (the REST API server over its real unix socket), "api-http-parse"
(the request-head parser) and "config-json" (the VmConfig JSON a vm.create body carries).

Requests come from a grammar close to what clients send (methods, every endpoint, odd
targets and versions, Content-Length/Connection/Expect/Transfer-Encoding variants, bare LF
line ends, bodies, pipelining) with a byte-level mutation on top. For any request bytes:
- the server answers with well-formed HTTP/1.1 responses (or waits for the rest of an
  incomplete request), never logs an internal error, and a new connection is served at once;
- the parser returns a head or raises HttpError with a 4xx/5xx status, nothing else;
- a config document is a VmConfig or a ConfigJsonError; an accepted one survives a round trip
  through JSON unchanged.
Byte inputs that once failed live in tests/fuzz/corpus/api-http/ and are replayed here.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from strato.api import http
from strato.api.handlers import BodyError, loads_strict
from strato.api.routes import ROUTES
from strato.vmm.config_json import ConfigJsonError, vm_config_from_json, vm_config_to_json
from tests.api.helpers import ApiEnv, FakeFactory, close_api_env, exchange, make_api_env
from tests.fuzz._support import corpus_params, count, fuzz_settings, no_internal_errors

# Bugs this suite found, fixed, and kept as regressions below and in corpus/api-http/:
# - a Content-Length of Latin-1 superscript digits passed str.isdigit() and int() raised out
#   of the parser (500 and a dropped connection instead of 400);
# - ApiServer.close() wrote the wake eventfd after the server thread could have closed it.

# -- the request grammar -------------------------------------------------------------------------
_PATHS = [p for p in ROUTES if not p.endswith("vmm.shutdown")]  # that one stops the VMM
targets = st.one_of(
    st.sampled_from(_PATHS),
    st.sampled_from(_PATHS).map(lambda p: p + "?x=1#frag"),
    st.sampled_from(
        [
            "/",
            "/api/v1/",
            "/api/v1/vm.info/",
            "http://localhost/api/v1/vmm.ping",
            "https://h",
            "*",
            "api/v1/vmm.ping",
            "/api/v1/../v1/vmm.ping",
            "/\xe9",
            "",
        ]
    ),
)
methods = st.sampled_from(["GET", "PUT", "GET", "PUT", "POST", "DELETE", "get", "", "G\x00T"])
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "http/1.1", "HTTP/1"])
content_lengths = st.one_of(
    st.integers(0, 300).map(str),
    st.sampled_from(["-1", "1e3", "0x10", " 5", "+5", "5, 5", "", "99999999999999999999"]),
)
headers = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["Content-Length", "content-length"]), content_lengths),
        st.tuples(st.just("Connection"), st.sampled_from(["close", "keep-alive", "Close", "x"])),
        st.tuples(st.just("Expect"), st.sampled_from(["100-continue", "200-ok"])),
        st.tuples(st.just("Transfer-Encoding"), st.sampled_from(["chunked", "identity"])),
        st.tuples(st.just("Host"), st.sampled_from(["localhost", ""])),
        st.tuples(
            st.sampled_from(["X-Junk", "Content-Type", " Folded", "Bad Name", "", "X:Y"]),
            st.text(st.characters(max_codepoint=0xFF), max_size=12),
        ),
    ),
    max_size=6,
)
_CONFIG = {"payload": {"kernel": "/k"}, "memory": {"size": 16 << 20}}
bodies = st.one_of(
    st.just(b""),
    st.just(json.dumps(_CONFIG).encode()),
    st.binary(max_size=40),
    st.sampled_from([b"{}", b"[]", b'{"payload": {"kernel": "/k"}, "a": 1, "a": 2}', b"\xff"]),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    eol = draw(st.sampled_from(["\r\n", "\r\n", "\n"]))
    body = draw(bodies)
    hdrs = draw(headers)
    if draw(st.booleans()):
        hdrs.append(("Content-Length", str(len(body))))
    line = f"{draw(methods)} {draw(targets)} {draw(versions)}"
    head = eol.join([line] + [f"{k}: {v}" for k, v in hdrs]) + eol + eol
    raw = head.encode("latin-1", errors="replace") + body
    if draw(st.booleans()):  # pipelined: a ping right behind it
        raw += b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n"
    mutation = draw(
        st.none() | st.tuples(st.integers(0, len(raw)), st.integers(0, 2), st.binary(max_size=3))
    )
    if mutation is not None:
        pos, kind, data = mutation
        if kind == 0:
            raw = raw[:pos] + data + raw[pos:]
        elif kind == 1:
            raw = raw[:pos] + raw[pos + len(data) + 1 :]
        else:
            raw = raw[:pos] + data + raw[pos + len(data) :]
    return raw


# -- reading what the server answers -------------------------------------------------------------
def collect(sock: socket.socket, quiet: float = 0.01, first: float = 0.05) -> tuple[bytes, bool]:
    """Everything the server sends until it closes, or goes quiet; (data, closed)."""
    data = b""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        sock.settimeout(quiet if data else first)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    raise AssertionError("the server kept sending for 5 s")


_STATUS_LINE = re.compile(rb"^HTTP/1\.1 (\d{3}) [^\r\n]*$")


def split_responses(data: bytes) -> list[int]:
    """The statuses of the complete, well-formed responses `data` consists of."""
    statuses = []
    while data:
        end = data.find(b"\r\n\r\n")
        assert end >= 0, f"truncated response head {data[:80]!r}"
        lines = data[:end].split(b"\r\n")
        m = _STATUS_LINE.match(lines[0])
        assert m, f"bad status line {lines[0]!r}"
        status = int(m.group(1))
        fields = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            assert sep, f"bad header line {line!r}"
            fields[name.strip().lower()] = value.strip()
        length = int(fields.get(b"content-length", b"0"))
        if status >= 200 and status != 204:
            assert b"content-length" in fields
        body = data[end + 4 : end + 4 + length]
        assert len(body) == length, "truncated body"
        if length:
            json.loads(body)  # every body the API sends is JSON
        statuses.append(status)
        data = data[end + 4 + length :]
    return statuses


@pytest.fixture
def api() -> Iterator[ApiEnv]:
    """One VMM for a whole test: it must keep serving whatever came before."""
    env = make_api_env(FakeFactory())
    yield env
    close_api_env(env)


def serve_bytes(env: ApiEnv, raw: bytes) -> None:
    with no_internal_errors():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(env.path))
            s.sendall(raw)
            data, _closed = collect(s)
        for status in split_responses(data):
            assert 100 <= status < 600
        ping = exchange(env.path, b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
        assert ping.status == 200 and json.loads(ping.body)["version"]


@fuzz_settings(120)
@given(raw=requests())
@example(raw=b"PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n")
@example(raw=b"\r\n\r\nGET /api/v1/vm.info HTTP/1.0\nConnection: keep-alive\n\n")
def test_api_server_over_its_socket(api: ApiEnv, raw: bytes) -> None:
    count("api-http")
    serve_bytes(api, raw)


@pytest.mark.parametrize(
    "raw",
    corpus_params("api-http"),
)
def test_api_server_corpus(api: ApiEnv, raw: bytes) -> None:
    count("api-http")
    serve_bytes(api, raw)


def test_content_length_with_a_superscript_digit_is_400() -> None:
    with pytest.raises(http.HttpError) as e:
        http.parse_head(
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 5\xb2", max_body_bytes=100
        )
    assert e.value.status == 400


class _CloseFirst:
    """The server's wake eventfd, with the main thread descheduled right after close() set
    _stopping: the server thread sees it at its next select timeout and finishes first."""

    def __init__(self, server: Any) -> None:
        self.server, self.real = server, server._wake

    @property
    def fd(self) -> int:
        return int(self.real.fd)

    def write(self, value: int = 1) -> None:
        self.server._thread.join(5)
        self.real.write(value)

    def read(self) -> int:
        return int(self.real.read())

    def close(self) -> None:
        self.real.close()


def test_api_server_close_races_its_thread() -> None:
    env = make_api_env(FakeFactory())
    env.server._wake = _CloseFirst(env.server)  # type: ignore[assignment]
    try:
        env.server.close()  # raises OSError(EBADF), or ValueError once the fd is -1
    finally:
        env.server._wake = env.server._wake.real  # type: ignore[attr-defined]
        close_api_env(env)


@fuzz_settings(800)
@given(raw=requests())
def test_request_head_parser(raw: bytes) -> None:
    count("api-http-parse")
    found = http.find_head_end(raw)
    head = raw if found is None else raw[: found[0]]
    try:
        parsed = http.parse_head(head, max_body_bytes=100)
    except http.HttpError as e:
        assert 400 <= e.status < 600 and e.messages
        return
    assert parsed.path.startswith("/")
    assert 0 <= parsed.content_length <= 100
    assert parsed.version[0] == 1


# -- config JSON ---------------------------------------------------------------------------------
_FULL: dict[str, Any] = {
    "payload": {"kernel": "/k", "cmdline": "console=ttyS0", "initramfs": "/i"},
    "cpus": {"boot_vcpus": 2, "max_vcpus": 4},
    "memory": {"size": 64 << 20, "shared": False, "hugepages": False},
    "disks": [
        {
            "path": "/d",
            "readonly": True,
            "direct": False,
            "num_queues": 1,
            "queue_size": 128,
            "id": "d0",
            "serial": "abc",
            "rate_limiter_config": {
                "bandwidth": {"size": 1, "one_time_burst": 0, "refill_time": 1}
            },
        }
    ],
    "net": [{"tap": "t0", "mac": "12:34:56:78:9a:bc", "ip": "10.0.0.1", "mask": "255.0.0.0"}],
    "rng": {"src": "/dev/urandom"},
    "serial": {"mode": "File", "file": "/s"},
    "console": {"mode": "Off"},
}


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


_ALL_PATHS = _paths(_FULL)[1:]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.sampled_from([0, 1, -1, 2, 3, 7, 255, 256, 2**31, 2**63, 2**64, -(2**63), 10**30])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "x", "Off", "Tty", "File", "Socket", "1G", "\x00", "12:34:56:78:9a:bc"])
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
mutations = st.lists(
    st.tuples(
        st.sampled_from(_ALL_PATHS), st.sampled_from(["set", "set", "delete", "extra"]), json_values
    ),
    min_size=1,
    max_size=4,
)


def mutate(doc: dict[str, Any], muts: list[tuple[tuple[Any, ...], str, Any]]) -> Any:
    out: Any = copy.deepcopy(doc)
    for path, how, value in muts:
        parent: Any = out
        for key in path[:-1]:
            if isinstance(parent, dict) and key in parent:
                parent = parent[key]
            elif isinstance(parent, list) and isinstance(key, int) and key < len(parent):
                parent = parent[key]
            else:
                parent = None
                break
        last = path[-1]
        if isinstance(parent, dict):
            if how == "delete":
                parent.pop(last, None)
            elif how == "extra":
                parent["unknown_field"] = value
            else:
                parent[last] = value
        elif isinstance(parent, list) and isinstance(last, int) and last < len(parent):
            if how == "delete":
                del parent[last]
            else:
                parent[last] = value
    return out


@fuzz_settings(400)
@given(muts=mutations, as_bytes=st.booleans())
@example(muts=[(("memory", "size"), "set", 2**64)], as_bytes=True)
@example(muts=[(("disks", 0, "queue_size"), "set", 3)], as_bytes=False)
def test_config_json(muts: list[tuple[tuple[Any, ...], str, Any]], as_bytes: bool) -> None:
    count("config-json")
    doc = mutate(_FULL, muts)
    try:
        if as_bytes:  # the path a vm.create body takes
            doc = loads_strict(json.dumps(doc).encode())
        cfg = vm_config_from_json(doc)
    except (ConfigJsonError, BodyError):
        return
    again = vm_config_from_json(json.loads(json.dumps(vm_config_to_json(cfg))))
    assert again == cfg
    assert 1 <= cfg.cpus.boot_vcpus <= cfg.cpus.max_vcpus
    for d in cfg.disks:
        assert d.queue_size > 0 and d.queue_size & (d.queue_size - 1) == 0
    for n in cfg.net:
        assert n.queue_size > 0 and n.queue_size & (n.queue_size - 1) == 0


@fuzz_settings(300)
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_config_json_body_bytes(raw: bytes) -> None:
    count("config-json")
    try:
        vm_config_from_json(loads_strict(b'{"payload": ' + raw + b"}"))
    except (ConfigJsonError, BodyError):
        pass
