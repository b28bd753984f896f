"""HTTP request heads and responses, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strato.api import http


def parse(raw: bytes, max_body: int = 1000) -> http.RequestHead:
    end = http.find_head_end(raw)
    assert end is not None
    return http.parse_head(raw[: end[0]], max_body_bytes=max_body)


def test_request_head() -> None:
    head = parse(
        b"PUT /api/v1/vm.create?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 12\r\n"
        b"X-A: 1\r\nx-a: 2\r\n\r\n"
    )
    assert (head.method, head.path, head.version) == ("PUT", "/api/v1/vm.create", (1, 1))
    assert head.content_length == 12 and head.keep_alive
    assert head.headers["x-a"] == "1, 2"


def test_bare_lf_line_ends() -> None:
    assert parse(b"GET /a HTTP/1.0\nConnection: keep-alive\n\n").keep_alive


@pytest.mark.parametrize(
    ("raw", "status", "words"),
    [
        (b"GET /a HTTP/1.1\r\nContent-Length: 1001\r\n\r\n", 413, "limited to 1000 bytes"),
        (
            b"GET /a HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            400,
            "malformed Content-Length",
        ),
        (b"GET /a HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n", 400, "malformed Content-Length"),
        (b"GET /a HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400, "invalid character in x"),
        (b"GET /a HTTP/3.0\r\n\r\n", 505, "only HTTP/1.0 and HTTP/1.1"),
        (
            b"GET /a HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
            501,
            "Transfer-Encoding is not supported",
        ),
    ],
)
def test_bad_heads(raw: bytes, status: int, words: str) -> None:
    with pytest.raises(http.HttpError, match=words) as e:
        parse(raw)
    assert e.value.status == status


def test_responses() -> None:
    assert http.response(204) == (
        b"HTTP/1.1 204 No Content\r\nServer: strato API\r\nConnection: keep-alive\r\n\r\n"
    )
    r = http.json_response(200, {"a": 1}, keep_alive=False)
    assert r.endswith(b'Content-Length: 7\r\nConnection: close\r\n\r\n{"a":1}')
    e = http.error_response(405, ["Method Not Allowed"], keep_alive=True, headers={"Allow": "GET"})
    assert b"Allow: GET\r\n" in e and e.endswith(b'["Method Not Allowed"]')


@given(st.binary(max_size=300))
def test_any_head_parses_or_is_an_http_error(raw: bytes) -> None:
    try:
        http.parse_head(raw, max_body_bytes=100)
    except http.HttpError as e:
        assert 400 <= e.status < 600
