"""Attacks on the paths strato creates: a symlink or another file planted where strato writes
(serial, console and event-monitor files, the API socket and its lock), a world-writable socket
under umask 000, a file or directory at the socket path. Nothing planted may be followed,
truncated or deleted; what strato creates is 0600."""

from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from strato._sys.files import open_private
from strato.api.server import ApiServer, listen_at
from strato.devices.legacy.serial_output import FileSink
from strato.devices.virtio.console import Console
from strato.vmm.config import ConfigError
from strato.vmm.events import EventMonitor

SECRET = b"the victim's data\n"


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="stfs") as d:
        yield Path(d)


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def victim(workdir: Path) -> Path:
    v = workdir / "victim"
    v.write_bytes(SECRET)
    v.chmod(0o644)
    return v


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- open_private: the one way strato opens a file it creates ----------------------------------
def test_a_new_file_is_0600_under_umask_000(workdir: Path, umask_000: None) -> None:
    os.close(open_private(workdir / "new"))
    assert mode_of(workdir / "new") == 0o600


def test_a_symlink_is_refused_and_its_target_untouched(workdir: Path, victim: Path) -> None:
    link = workdir / "link"
    link.symlink_to(victim)
    with pytest.raises(OSError) as e:
        open_private(link, truncate=True)
    assert e.value.errno == errno.ELOOP
    assert e.value.filename == link
    assert (e.value.strerror or "").startswith(
        "a symbolic link; strato only writes to a regular file"
    )
    assert victim.read_bytes() == SECRET and mode_of(victim) == 0o644


def test_a_dangling_symlink_does_not_create_its_target(workdir: Path) -> None:
    link, target = workdir / "link", workdir / "would-be-created"
    link.symlink_to(target)
    with pytest.raises(OSError) as e:
        open_private(link)
    assert e.value.errno == errno.ELOOP
    assert not target.exists()


@pytest.mark.parametrize(
    ("make", "code", "what"),
    [
        (lambda p: p.mkdir(), errno.EISDIR, "a directory"),
        (lambda p: socket.socket(socket.AF_UNIX).bind(str(p)), errno.EINVAL, "a socket"),
    ],
)
def test_a_directory_or_socket_is_refused(
    workdir: Path, make: object, code: int, what: str
) -> None:
    p = workdir / "thing"
    make(p)  # type: ignore[operator]
    with pytest.raises(OSError) as e:
        open_private(p)
    assert e.value.errno == code
    assert (e.value.strerror or "").startswith(what + ";")


def test_a_device_that_is_not_a_tty_is_refused() -> None:
    with pytest.raises(OSError) as e:
        open_private("/dev/null")
    assert (e.value.strerror or "").startswith("a character device that is not a terminal;")


def test_a_regular_file_is_truncated_only_when_asked(workdir: Path, victim: Path) -> None:
    os.close(open_private(victim, os.O_WRONLY | os.O_APPEND))
    assert victim.read_bytes() == SECRET
    os.close(open_private(victim, truncate=True))
    assert victim.read_bytes() == b""
    assert mode_of(victim) == 0o644  # an existing file keeps its mode


def test_a_fifo_and_a_tty_are_used(workdir: Path) -> None:
    fifo = workdir / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fd = open_private(fifo, os.O_WRONLY | os.O_NONBLOCK, truncate=True)
        os.write(fd, b"x")
        os.close(fd)
        assert os.read(reader, 1) == b"x"
    finally:
        os.close(reader)
    master, slave = os.openpty()
    try:
        fd = open_private(os.ttyname(slave), truncate=True)
        assert os.isatty(fd)
        os.close(fd)
    finally:
        os.close(master)
        os.close(slave)


# -- every site strato creates a file at ------------------------------------------------------
def test_the_serial_file_does_not_follow_a_symlink(workdir: Path, victim: Path) -> None:
    link = workdir / "serial.log"
    link.symlink_to(victim)
    with pytest.raises(OSError, match="a symbolic link"):
        FileSink(link)
    assert victim.read_bytes() == SECRET


def test_the_console_file_does_not_follow_a_symlink(workdir: Path, victim: Path) -> None:
    link = workdir / "console.log"
    link.symlink_to(victim)
    with pytest.raises(OSError, match="a symbolic link"):
        Console(output=str(link))
    assert victim.read_bytes() == SECRET


def test_the_event_monitor_does_not_follow_a_symlink(workdir: Path, victim: Path) -> None:
    link = workdir / "events.json"
    link.symlink_to(victim)
    with pytest.raises(ConfigError) as e:
        EventMonitor.from_option(f"path={link}")
    assert str(e.value).startswith(f"--event-monitor path={link}: a symbolic link;")
    assert victim.read_bytes() == SECRET


def test_every_output_file_is_0600_under_umask_000(workdir: Path, umask_000: None) -> None:
    sink = FileSink(workdir / "serial.log")
    sink.close()
    console = Console(output=str(workdir / "console.log"))
    console.close()
    monitor = EventMonitor.open(workdir / "events.json")
    monitor.close()
    for name in ("serial.log", "console.log", "events.json"):
        assert mode_of(workdir / name) == 0o600, name


def test_the_serial_file_is_truncated_as_cloud_hypervisor_does(workdir: Path) -> None:
    log = workdir / "serial.log"
    log.write_bytes(b"old boot\n")
    FileSink(log).close()
    assert log.read_bytes() == b""


# -- the API socket ---------------------------------------------------------------------------
def serve(path: Path) -> tuple[socket.socket, int]:
    return listen_at(path, 4)


def test_the_socket_is_0600_under_umask_000(workdir: Path, umask_000: None) -> None:
    sock = workdir / "api.sock"
    listener, lock = serve(sock)
    try:
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        assert mode_of(sock) == 0o600
        assert mode_of(Path(f"{sock}.lock")) == 0o600
        assert os.umask(0) == 0  # the caller's umask is back
    finally:
        listener.close()
        os.close(lock)


@pytest.mark.parametrize("kind", ["regular file", "directory", "symlink", "dangling symlink"])
def test_something_else_at_the_socket_path_is_refused_not_deleted(
    workdir: Path, victim: Path, kind: str
) -> None:
    sock = workdir / "api.sock"
    if kind == "regular file":
        sock.write_bytes(SECRET)
        what = "a regular file"
    elif kind == "directory":
        sock.mkdir()
        (sock / "inside").write_bytes(SECRET)
        what = "a directory"
    else:
        sock.symlink_to(victim if kind == "symlink" else workdir / "nowhere")
        what = "a symbolic link"
    with pytest.raises(ConfigError) as e:
        serve(sock)
    assert str(e.value) == (
        f"--api-socket path={sock}: the path exists and is {what}; strato replaces only a "
        "stale socket (remove it, or choose another path)"
    )
    if kind == "regular file":
        assert sock.read_bytes() == SECRET
    elif kind == "directory":
        assert (sock / "inside").read_bytes() == SECRET
    else:
        assert sock.is_symlink()
    assert victim.read_bytes() == SECRET
    assert not (workdir / "nowhere").exists()


def test_a_symlink_at_the_lock_path_is_refused(workdir: Path) -> None:
    sock, target = workdir / "api.sock", workdir / "created-by-strato"
    Path(f"{sock}.lock").symlink_to(target)
    with pytest.raises(ConfigError) as e:
        serve(sock)
    assert str(e.value).startswith(f"--api-socket path={sock}: {sock}.lock: a symbolic link;")
    assert not target.exists() and not sock.exists()


def test_a_live_socket_is_refused_and_kept(workdir: Path) -> None:
    sock = workdir / "api.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(sock))
    other.listen(1)
    try:
        with pytest.raises(ConfigError) as e:
            serve(sock)
        assert str(e.value) == f"--api-socket path={sock}: a live socket another process serves"
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(sock))  # still the other server's
        client.close()
    finally:
        other.close()


def test_a_stale_socket_is_replaced(workdir: Path) -> None:
    sock = workdir / "api.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock))
    dead.close()  # a VMM that died: the file stays, nobody listens
    sock.chmod(0o755)
    listener, lock = serve(sock)
    try:
        assert mode_of(sock) == 0o600  # a new socket, not the old file
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(sock))
        client.close()
    finally:
        listener.close()
        os.close(lock)


def test_a_second_strato_on_the_same_path_is_refused(workdir: Path) -> None:
    sock = workdir / "api.sock"
    listener, lock = serve(sock)
    try:
        with pytest.raises(ConfigError, match="in use by another VMM"):
            serve(sock)
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    finally:
        listener.close()
        os.close(lock)


def test_close_removes_only_the_socket_it_bound(workdir: Path, victim: Path) -> None:
    from strato.api.handlers import ApiHandler

    class NoController:
        pass

    sock = workdir / "api.sock"
    listener, lock = serve(sock)
    server = ApiServer(listener, ApiHandler(NoController()), path=sock, lock_fd=lock)  # type: ignore[arg-type]
    sock.unlink()
    sock.symlink_to(victim)  # replaced while strato ran
    server.close()
    assert sock.is_symlink() and victim.read_bytes() == SECRET
