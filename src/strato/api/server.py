"""The REST API server: HTTP/1.1 on a unix socket, one thread, epoll.

One thread serves every connection (as Cloud Hypervisor's micro_http does) and never blocks:
sockets are non-blocking, a complete request is handed to the VMM thread through the
controller's queue, and the answer comes back through a wake-up eventfd. Each connection has
at most one request in flight (pipelined requests wait in its bounded buffer), so memory is
bounded by `Limits`: connections x (head + body). Slow, silent or half-open clients are timed
out; none of it reaches the VMM or the guest.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from strato._sys.eventfd import EventFd
from strato._sys.files import open_private
from strato.api import http
from strato.api.handlers import ApiHandler, Reply
from strato.api.routes import ROUTES, Body, Endpoint
from strato.vmm.config import ConfigError
from strato.vmm.controller import VmmController

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 8 << 10
    max_body_bytes: int = 1 << 20
    max_connections: int = 64
    request_timeout: float = 10.0  # a request that started must be complete by then (408)
    idle_timeout: float = 60.0  # a keep-alive connection with nothing to do is closed
    write_timeout: float = 10.0  # a client that does not read its answer is dropped
    evict_idle_after: float = 1.0  # with every slot taken, an idle connection may be closed
    backlog: int = 128


def api_socket_target(value: str) -> Path | int:
    """`--api-socket path=PATH`, `fd=N`, or a bare PATH (Cloud Hypervisor's older syntax)."""
    if value.startswith("fd="):
        try:
            return int(value[3:])
        except ValueError:
            raise ConfigError(f"--api-socket {value}: fd= needs a number") from None
    if value.startswith("path="):
        value = value[5:]
    if not value or "," in value:
        raise ConfigError(f"--api-socket {value!r}: expected path=PATH or fd=N")
    return Path(value)


class _Conn:
    __slots__ = (
        "buf",
        "busy",
        "close_after",
        "discard",
        "endpoint",
        "head",
        "id",
        "keep_alive",
        "last_activity",
        "linger_until",
        "out",
        "registered",
        "request_started",
        "sock",
        "write_started",
    )

    def __init__(self, sock: socket.socket, conn_id: int, now: float) -> None:
        self.sock = sock
        self.id = conn_id
        self.buf = bytearray()
        self.out = bytearray()
        self.head: http.RequestHead | None = None
        self.endpoint: Endpoint | None = None
        self.busy = False  # a request is with the VMM
        self.keep_alive = True  # of the request in flight
        self.close_after = False  # close once `out` is written
        self.discard = 0  # body bytes of an answered request still to skip
        self.linger_until: float | None = None  # half-closed: drain input until then
        self.last_activity = now
        self.request_started: float | None = None
        self.write_started: float | None = None
        self.registered = 0  # the selector events registered

    @property
    def idle(self) -> bool:
        return (
            not self.busy
            and not self.out
            and not self.buf
            and self.head is None
            and not self.discard
        )


class ApiServer:
    """Serves `handler` on a listening unix socket from its own thread."""

    def __init__(
        self,
        listener: socket.socket,
        handler: ApiHandler,
        limits: Limits | None = None,
        *,
        path: Path | None = None,
        lock_fd: int | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.handler = handler
        self.path = path
        self._listener = listener
        self._lock_fd = lock_fd
        self._ident = _identity(path) if path is not None else None  # the socket we bound
        self._listener.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._wake = EventFd()
        self._sel.register(self._listener, selectors.EVENT_READ, "listener")
        self._sel.register(self._wake.fd, selectors.EVENT_READ, "wake")
        self._conns: dict[int, _Conn] = {}
        self._next_id = 0
        self._done: list[tuple[int, Reply]] = []
        self._done_lock = threading.Lock()
        self._stopping = False
        self._accepting = True
        self._thread: threading.Thread | None = None
        self.requests_served = 0
        self.connections_accepted = 0
        self.peak_connections = 0
        self.on_thread_start: Callable[[], None] | None = None  # e.g. the API seccomp filter

    # -- control ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="http-server", daemon=True)
        self._thread.start()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def close(self, timeout: float = 2.0) -> None:
        """Stop: write the answers already due (for up to `timeout`), close every connection,
        remove the socket file."""
        if self._stopping:
            return
        self._stopping = True
        with self._done_lock:  # the server thread closes the eventfd under this lock
            if self._wake.fd >= 0:
                self._wake.write(1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout + 1.0)
        if (
            self.path is not None
            and self._ident is not None
            and _identity(self.path) == self._ident
        ):
            # Ours still (not something put there since): remove it. Under landlock this
            # fails (no right to remove in the directory); the next start removes it as stale.
            try:
                os.unlink(self.path)
            except OSError:
                pass
            try:
                os.unlink(f"{self.path}.lock")
            except OSError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- replies from the VMM thread ------------------------------------------------------------
    def _reply_to(self, conn_id: int) -> Callable[[Reply], None]:
        def reply(r: Reply) -> None:
            with self._done_lock:  # the server thread closes the eventfd under this lock
                if self._wake.fd >= 0:
                    self._done.append((conn_id, r))
                    self._wake.write(1)

        return reply

    # -- the server thread --------------------------------------------------------------------
    def _serve(self) -> None:
        if self.on_thread_start is not None:
            self.on_thread_start()
        try:
            while not self._stopping:
                try:
                    for key, mask in self._sel.select(self._next_timeout()):
                        self._on_event(key.data, mask)
                    self._deliver_replies()
                    self._sweep(time.monotonic())
                except Exception:  # a bug here must not take the API down
                    log.exception("API server error")
                    time.sleep(0.01)
            self._drain(time.monotonic() + 1.0)
        except Exception:
            log.exception("API server error while stopping")
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            self._sel.close()
            self._listener.close()
            with self._done_lock:
                self._wake.close()

    def _on_event(self, data: object, mask: int) -> None:
        if data == "listener":
            self._accept()
        elif data == "wake":
            self._wake.read()
        else:
            assert isinstance(data, _Conn)
            conn = data
            try:
                if mask & selectors.EVENT_WRITE:
                    self._flush(conn)
                    self._process(conn)
                if mask & selectors.EVENT_READ and conn.id in self._conns:
                    self._read(conn)
            except Exception:
                log.exception("API connection %d failed; it is closed", conn.id)
                self._close(conn)

    def _next_timeout(self) -> float:
        return 0.25 if self._conns else 1.0

    def _accept(self) -> None:
        for _ in range(64):
            if len(self._conns) >= self.limits.max_connections and not self._evict():
                self._pause_accepting()
                return
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("API: cannot accept a connection: %s", e)
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting()  # retried from _sweep
                return
            sock.setblocking(False)
            self._next_id += 1
            conn = _Conn(sock, self._next_id, time.monotonic())
            self._conns[conn.id] = conn
            self.connections_accepted += 1
            self.peak_connections = max(self.peak_connections, len(self._conns))
            self._set_interest(conn)

    def _evict(self) -> bool:
        """Every slot is taken: close the connection idle for the longest, if one has been idle
        for `evict_idle_after` (clients reopen idle keep-alive connections the server closed)."""
        now = time.monotonic()
        idle = [
            c
            for c in self._conns.values()
            if c.idle and now - c.last_activity >= self.limits.evict_idle_after
        ]
        if not idle:
            return False
        self._close(min(idle, key=lambda c: c.last_activity))
        return True

    def _pause_accepting(self) -> None:
        """New clients wait in the listen backlog until a slot frees."""
        if self._accepting:
            self._sel.unregister(self._listener)
            self._accepting = False

    def _resume_accepting(self) -> None:
        if not self._accepting and not self._stopping:
            self._sel.register(self._listener, selectors.EVENT_READ, "listener")
            self._accepting = True

    def _read(self, conn: _Conn) -> None:
        room = self.limits.max_header_bytes + self.limits.max_body_bytes + 4 - len(conn.buf)
        try:
            data = conn.sock.recv(max(1, min(65536, room)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        if conn.linger_until is not None:
            return  # a closing connection: what the client still sends is dropped
        now = time.monotonic()
        conn.last_activity = now
        if conn.request_started is None:
            conn.request_started = now
        conn.buf += data
        self._process(conn)

    def _process(self, conn: _Conn) -> None:
        """Parse what is buffered; dispatch at most one request (the next waits its turn)."""
        limits = self.limits
        while (
            not conn.busy
            and not conn.out
            and conn.id in self._conns
            and conn.linger_until is None
            and (conn.buf or conn.head is not None)
        ):
            if conn.discard:
                skipped = min(conn.discard, len(conn.buf))
                del conn.buf[:skipped]
                conn.discard -= skipped
                if conn.discard:
                    return
                continue
            if conn.head is None:
                if conn.buf[:1] in (bytearray(b"\r"), bytearray(b"\n")):  # stray line ends
                    conn.buf = bytearray(conn.buf.lstrip(b"\r\n"))
                    if not conn.buf:
                        conn.request_started = None
                        return
                found = http.find_head_end(conn.buf)
                if found is None:
                    if len(conn.buf) > limits.max_header_bytes:
                        self._fail(conn, http.HttpError(431, "Request Header Fields Too Large"))
                    return
                end, body_start = found
                if end > limits.max_header_bytes:
                    self._fail(conn, http.HttpError(431, "Request Header Fields Too Large"))
                    return
                try:
                    parsed = http.parse_head(
                        bytes(conn.buf[:end]), max_body_bytes=limits.max_body_bytes
                    )
                except http.HttpError as e:
                    self._fail(conn, e)
                    return
                del conn.buf[:body_start]
                if not self._route(conn, parsed):
                    continue
            head, endpoint = conn.head, conn.endpoint
            assert head is not None and endpoint is not None
            length = head.content_length
            if len(conn.buf) < length:
                return
            body = bytes(conn.buf[:length])
            del conn.buf[:length]
            conn.head = conn.endpoint = None
            conn.busy = True
            conn.keep_alive = head.keep_alive
            conn.request_started = time.monotonic() if conn.buf else None
            self._set_interest(conn)
            log.debug("API request %s %s", head.method, head.path)
            self.handler.handle(endpoint, body, self._reply_to(conn.id))

    def _route(self, conn: _Conn, head: http.RequestHead) -> bool:
        """Find the endpoint; answer at once when there is none. True if the request goes on."""
        endpoint = ROUTES.get(head.path)
        has_body = head.content_length > 0
        if endpoint is None:
            error = http.HttpError(404, "Not Found", f"no endpoint {head.path}")
        elif head.method != endpoint.method:
            self._answer_early(
                conn,
                head,
                http.HttpError(
                    405,
                    "Method Not Allowed",
                    f"{head.method} {head.path}: this endpoint takes {endpoint.method}",
                ),
                {"Allow": endpoint.method},
            )
            return False
        elif endpoint.body is Body.NONE and has_body:
            error = http.HttpError(400, "Bad Request", f"{endpoint.name} takes no request body")
        elif endpoint.body is Body.REQUIRED and not has_body:
            error = http.HttpError(400, "Bad Request", f"{endpoint.name} needs a request body")
        else:
            conn.head, conn.endpoint = head, endpoint
            if head.expects_continue and len(conn.buf) < head.content_length:
                try:
                    conn.sock.send(http.CONTINUE)
                except OSError:
                    pass
            return True
        self._answer_early(conn, head, error)
        return False

    def _answer_early(
        self,
        conn: _Conn,
        head: http.RequestHead,
        error: http.HttpError,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer before the body is read; the body is then skipped. A client that waits for
        100 Continue never sends it: that connection is closed."""
        keep = head.keep_alive and not (head.expects_continue and head.content_length)
        conn.close_after = not keep
        conn.discard = head.content_length if keep else 0
        conn.request_started = time.monotonic() if conn.buf else None
        self._send(
            conn,
            http.error_response(error.status, error.messages, keep_alive=keep, headers=headers),
        )

    def _fail(self, conn: _Conn, error: http.HttpError) -> None:
        """A malformed request: answer and close (the stream can no longer be trusted)."""
        log.info("API: bad request on connection %d: %s", conn.id, error)
        conn.close_after = True
        conn.buf.clear()
        self._send(conn, http.error_response(error.status, error.messages, keep_alive=False))

    def _deliver_replies(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
        for conn_id, reply in done:
            conn = self._conns.get(conn_id)
            if conn is None:
                continue  # the client went away
            conn.busy = False
            self.requests_served += 1
            keep = conn.keep_alive
            if reply.errors is not None:
                data = http.error_response(reply.status, reply.errors, keep_alive=keep)
            elif reply.status == 200:
                data = http.json_response(200, reply.value, keep_alive=keep)
            else:
                data = http.response(reply.status, keep_alive=keep)
            conn.close_after = not keep
            try:
                self._send(conn, data)
                self._process(conn)
            except Exception:
                log.exception("API connection %d failed; it is closed", conn.id)
                self._close(conn)

    def _send(self, conn: _Conn, data: bytes) -> None:
        conn.out += data
        if conn.write_started is None:
            conn.write_started = time.monotonic()
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn)
                return
            del conn.out[:n]
            conn.last_activity = time.monotonic()
        if conn.out:
            self._set_interest(conn)
            return
        conn.write_started = None
        if conn.close_after:
            self._linger(conn)
            return
        self._set_interest(conn)

    def _linger(self, conn: _Conn) -> None:
        """Close gracefully: end our side, then drop what the client still sends for a moment,
        so that closing with unread input does not reset the answer it has yet to read."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.linger_until = time.monotonic() + 1.0
        conn.buf.clear()
        conn.head = conn.endpoint = None
        conn.discard = 0
        conn.close_after = False
        self._set_interest(conn)

    def _set_interest(self, conn: _Conn) -> None:
        if conn.id not in self._conns:
            return
        if conn.out:
            want = selectors.EVENT_WRITE
        elif conn.busy:
            want = 0
        else:
            want = selectors.EVENT_READ
        if want == conn.registered:
            return
        if conn.registered and want:
            self._sel.modify(conn.sock, want, conn)
        elif want:
            self._sel.register(conn.sock, want, conn)
        else:
            self._sel.unregister(conn.sock)
        conn.registered = want

    def _close(self, conn: _Conn) -> None:
        if self._conns.pop(conn.id, None) is None:
            return
        if conn.registered:
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.registered = 0
        conn.sock.close()
        if len(self._conns) < self.limits.max_connections:
            self._resume_accepting()

    def _sweep(self, now: float) -> None:
        limits = self.limits
        if not self._accepting and (len(self._conns) < limits.max_connections or self._evict()):
            self._resume_accepting()
        for conn in list(self._conns.values()):
            if conn.linger_until is not None:
                if now > conn.linger_until:
                    self._close(conn)
                continue
            if conn.busy:
                continue
            if conn.out:
                if (
                    conn.write_started is not None
                    and now - conn.write_started > limits.write_timeout
                ):
                    log.info("API: connection %d does not read its answer; closed", conn.id)
                    self._close(conn)
            elif conn.buf or conn.head is not None or conn.discard:
                started = conn.request_started if conn.request_started is not None else now
                conn.request_started = started
                if now - started > limits.request_timeout:
                    log.info("API: request on connection %d timed out", conn.id)
                    self._fail(conn, http.HttpError(408, "Request Timeout"))
            elif now - conn.last_activity > limits.idle_timeout:
                self._close(conn)

    def _drain(self, deadline: float) -> None:
        """On close: deliver the answers that are due and write them out, until `deadline`."""
        self._pause_accepting()
        while time.monotonic() < deadline:
            self._deliver_replies()
            if not any(c.out for c in self._conns.values()):
                return
            for key, mask in self._sel.select(0.05):
                if isinstance(key.data, _Conn) and mask & selectors.EVENT_WRITE:
                    self._flush(key.data)
                elif key.data == "wake":
                    self._wake.read()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def _lock_socket_path(path: Path) -> int:
    """Cloud Hypervisor's PATH.lock: one VMM per socket path. Opened without following a
    symlink and created 0600; it must be a regular file."""
    lock = f"{path}.lock"
    try:
        fd = open_private(lock, os.O_WRONLY)
    except OSError as e:
        raise ConfigError(f"--api-socket path={path}: {lock}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"--api-socket path={path}: {lock}: not a regular file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"--api-socket path={path}: in use by another VMM") from None
    return fd


def _remove_stale_socket(path: Path) -> None:
    """What is at `path` may go only if it is a socket nobody serves (a VMM that died left it).
    Anything else (a regular file, a directory, a symlink, a live socket) is refused, untouched."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "a directory"
        if not stat.S_ISLNK(mode) and not stat.S_ISDIR(mode):
            what = "a regular file" if stat.S_ISREG(mode) else "not a socket"
        raise ConfigError(
            f"--api-socket path={path}: the path exists and is {what}; strato replaces only a "
            "stale socket (remove it, or choose another path)"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except ConnectionRefusedError:
        pass  # nobody listens: stale
    except OSError as e:
        raise ConfigError(f"--api-socket path={path}: {e.strerror or e}") from None
    else:
        raise ConfigError(f"--api-socket path={path}: a live socket another process serves")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_umask_lock = threading.Lock()


def bind_private(path: Path, backlog: int) -> socket.socket:
    """A listening unix socket at `path` created with mode 0600 whatever the umask: bind runs
    under umask 0177, so the socket file never exists with a wider mode (a chmod after bind
    would leave a window). The umask is process-wide: other threads creating a file during the
    bind get a narrower mode for that moment, never a wider one. bind() itself fails with
    EADDRINUSE if anything appeared at `path` since the check: nothing is ever replaced."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with _umask_lock:
            old = os.umask(0o177)
            try:
                listener.bind(str(path))
            finally:
                os.umask(old)
        listener.listen(backlog)
    except OSError as e:
        listener.close()
        raise ConfigError(f"--api-socket path={path}: {e.strerror or e}") from None
    return listener


def listen_at(path: Path, backlog: int = Limits.backlog) -> tuple[socket.socket, int]:
    """Take PATH.lock, remove a stale socket, bind a 0600 socket: (listener, lock fd)."""
    lock_fd = _lock_socket_path(path)
    try:
        _remove_stale_socket(path)
        return bind_private(path, backlog), lock_fd
    except BaseException:
        os.close(lock_fd)
        raise


# Sockets bound ahead of `serve_api` (see `prebind`), by path.
_prebound: dict[Path, tuple[socket.socket, int]] = {}


def prebind(path: Path, backlog: int = Limits.backlog) -> None:
    """Bind `path` (and take its lock) now, for the `serve_api` call that comes later: with
    `--landlock` the socket is bound before strato confines itself, so no right on the
    socket's directory (to create or remove a socket there) is ever granted."""
    _prebound[path] = listen_at(path, backlog)


def serve_api(
    controller: VmmController,
    where: str | os.PathLike[str] | int,
    *,
    limits: Limits | None = None,
    on_thread_start: Callable[[], None] | None = None,
) -> ApiServer:
    """Serve the API for `controller` on a unix socket path, or on a listening socket's fd
    (taken over: closed by ApiServer.close()). Returns the running server."""
    if isinstance(where, int):
        listener = socket.socket(fileno=where)
        if listener.family != socket.AF_UNIX:
            listener.detach()
            raise ConfigError(f"--api-socket fd={where}: not a unix socket")
        listener.listen((limits or Limits()).backlog)
        server = ApiServer(listener, ApiHandler(controller), limits)
    else:
        path = Path(where)
        bound = _prebound.pop(path, None)
        listener, lock_fd = bound or listen_at(path, (limits or Limits()).backlog)
        server = ApiServer(listener, ApiHandler(controller), limits, path=path, lock_fd=lock_fd)
    server.on_thread_start = on_thread_start
    server.start()
    return server
