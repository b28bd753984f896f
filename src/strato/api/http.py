"""HTTP/1.1 message parsing and formatting for the API server: no sockets, no threads.

Only what the API needs and nothing a client could use to grow the server: a request head is
at most `max_header_bytes`, a body comes with Content-Length (no chunked encoding) and is at
most `max_body_bytes`. Errors carry the status to answer with.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from http import HTTPStatus

SERVER_NAME = "strato API"

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/(\d)\.(\d)$")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_MAX_HEADERS = 64


class HttpError(Exception):
    """A request that cannot be served; answered with `status` and the connection closed."""

    def __init__(self, status: int, *messages: str) -> None:
        super().__init__(": ".join(messages))
        self.status = status
        self.messages = list(messages)


@dataclass
class RequestHead:
    method: str
    target: str
    path: str
    version: tuple[int, int]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def content_length(self) -> int:
        return int(self.headers.get("content-length", "0"))

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version >= (1, 1):
            return "close" not in tokens
        return "keep-alive" in tokens

    @property
    def expects_continue(self) -> bool:
        return self.headers.get("expect", "").lower() == "100-continue"


def find_head_end(buf: bytes | bytearray, start: int = 0) -> tuple[int, int] | None:
    """(end of the head, start of the body) once the blank line that ends a head arrived."""
    m = _HEAD_END.search(buf, start)
    return None if m is None else (m.start(), m.end())


def parse_head(raw: bytes, *, max_body_bytes: int) -> RequestHead:
    """Parse a request head (request line and header fields, without the blank line)."""
    lines = raw.split(b"\n")
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
    while lines and lines[0] == b"":  # RFC 9112 2.2: ignore empty lines before a request
        lines.pop(0)
    if not lines:
        raise HttpError(400, "Bad Request", "empty request")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "Bad Request", "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise HttpError(400, "Bad Request", "malformed method")
    m = _VERSION.match(version)
    if m is None:
        raise HttpError(400, "Bad Request", "malformed HTTP version")
    major, minor = int(m.group(1)), int(m.group(2))
    if major != 1:
        raise HttpError(505, "HTTP Version Not Supported", "only HTTP/1.0 and HTTP/1.1")
    try:
        target_text = target.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "Bad Request", "non-ASCII request target") from None
    path = _path_of(target_text)
    headers: dict[str, str] = {}
    if len(lines) - 1 > _MAX_HEADERS:
        raise HttpError(431, "Request Header Fields Too Large", f"more than {_MAX_HEADERS} fields")
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise HttpError(400, "Bad Request", "obsolete line folding")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HttpError(400, "Bad Request", "malformed header field")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if any(c in text for c in "\r\n\x00"):
            raise HttpError(400, "Bad Request", f"invalid character in {key}")
        if key in headers:
            if key == "content-length" and headers[key] != text:
                raise HttpError(400, "Bad Request", "conflicting Content-Length fields")
            if key in ("content-length", "host", "transfer-encoding", "expect"):
                continue
            headers[key] = f"{headers[key]}, {text}"
        else:
            headers[key] = text
    head = RequestHead(method.decode("ascii"), target_text, path, (major, minor), headers)
    if "transfer-encoding" in headers:
        raise HttpError(
            501, "Not Implemented", "Transfer-Encoding is not supported; send a Content-Length"
        )
    cl = headers.get("content-length")
    if cl is not None:
        # ASCII digits only: str.isdigit() also accepts superscripts that int() refuses.
        if not (cl.isascii() and cl.isdigit()) or len(cl) > 19:
            raise HttpError(400, "Bad Request", "malformed Content-Length")
        if int(cl) > max_body_bytes:
            raise HttpError(
                413, "Payload Too Large", f"the body is limited to {max_body_bytes} bytes"
            )
    if "expect" in headers and not head.expects_continue:
        raise HttpError(417, "Expectation Failed", "only 100-continue is supported")
    return head


def _path_of(target: str) -> str:
    """The path of an origin-form or absolute-form target, without the query."""
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else "/"
    elif not target.startswith("/"):
        raise HttpError(400, "Bad Request", "the request target must be a path")
    return target.split("?", 1)[0].split("#", 1)[0]


def response(
    status: int,
    body: bytes | None = None,
    *,
    keep_alive: bool = True,
    headers: dict[str, str] | None = None,
) -> bytes:
    """A complete response. 204 and 1xx carry no body and no Content-Length."""
    reason = _reason(status)
    lines = [f"HTTP/1.1 {status} {reason}", f"Server: {SERVER_NAME}"]
    if status >= 200 and status != 204:
        data = body or b""
        if data:
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(data)}")
    else:
        data = b""
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def error_response(
    status: int, messages: list[str], *, keep_alive: bool, headers: dict[str, str] | None = None
) -> bytes:
    """Cloud Hypervisor's error response: a JSON array of messages, outermost first."""
    body = json.dumps(messages, ensure_ascii=False).encode()
    return response(status, body, keep_alive=keep_alive, headers=headers)


def json_response(status: int, value: object, *, keep_alive: bool) -> bytes:
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    return response(status, body, keep_alive=keep_alive)


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
