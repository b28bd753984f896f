"""Output sinks: bounded, never blocking the writer, counting what they drop."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import pytest

from strato.devices.legacy.serial_output import (
    CallbackSink,
    ConsoleLog,
    FileSink,
    NullSink,
    StreamSink,
    TtySink,
    as_output,
)


def test_null_sink_consumes() -> None:
    sink = NullSink()
    sink.write(b"abc")
    assert (sink.written, sink.dropped) == (3, 0)
    assert sink.flush()
    sink.close()


def test_file_sink_writes_everything(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    path.write_bytes(b"old contents")
    sink = FileSink(path)
    for i in range(1000):
        sink.write(b"line %d\n" % i)
    assert sink.flush(5)
    sink.close()
    assert path.read_bytes() == b"".join(b"line %d\n" % i for i in range(1000))
    assert sink.dropped == 0 and sink.written == path.stat().st_size
    sink.write(b"after close")
    assert sink.dropped == len(b"after close")


def test_file_sink_append(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    path.write_bytes(b"A")
    sink = FileSink(path, append=True)
    sink.write(b"B")
    sink.close()
    assert path.read_bytes() == b"AB"


def test_tty_sink_drops_instead_of_blocking_on_a_stalled_reader() -> None:
    r, w = os.pipe()
    sink = TtySink(w, capacity=4096)
    chunk = b"x" * 1024
    finished = threading.Event()

    def guest() -> None:  # 4 MiB: far more than the pipe and the buffer can hold
        for _ in range(4096):
            sink.write(chunk)
        finished.set()

    t = threading.Thread(target=guest)
    t.start()
    t.join(30)
    try:
        assert finished.is_set(), "write() blocked on a stalled reader"
        assert sink.dropped > 0
        assert sink.buffered <= sink.capacity
        assert sink.written + sink.buffered + sink.dropped <= 4096 * 1024
    finally:
        # Drain the pipe so the writer thread can finish, then check bytes add up.
        received = bytearray()
        os.set_blocking(r, False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                data = os.read(r, 1 << 16)
            except BlockingIOError:
                if sink.flush(0.05):
                    try:
                        received += os.read(r, 1 << 16)
                    except BlockingIOError:
                        pass
                    break
                continue
            received += data
        sink.close()
        os.close(r)
        os.close(w)  # TtySink does not own its fd
    assert len(received) == sink.written
    assert sink.written + sink.dropped == 4096 * 1024


def test_tty_sink_on_a_pty() -> None:
    master, slave = os.openpty()
    try:
        sink = TtySink(slave)
        sink.write(b"hello\r\n")
        assert sink.flush(5)
        got = b""
        deadline = time.monotonic() + 5
        while b"hello" not in got and time.monotonic() < deadline:
            got += os.read(master, 100)
        assert b"hello" in got
        sink.close()
        os.write(slave, b"")  # still open: the sink did not close a fd it does not own
    finally:
        os.close(master)
        os.close(slave)


def test_sink_survives_a_vanished_reader() -> None:
    r, w = os.pipe()
    os.close(r)
    sink = TtySink(w)
    sink.write(b"into the void")
    assert sink.flush(5)  # returns once the writer has failed
    sink.write(b"more")
    assert sink.dropped == len(b"into the void") + len(b"more")
    sink.close()
    os.close(w)


def test_stream_sink() -> None:
    buf = io.BytesIO()
    sink = StreamSink(buf)
    sink.write(b"abc")
    assert sink.flush(5)
    assert buf.getvalue() == b"abc"
    sink.close()


def test_callback_sink_counts_failures_without_raising() -> None:
    def boom(data: bytes) -> None:
        raise OSError("gone")

    sink = CallbackSink(boom)
    sink.write(b"ab")
    assert sink.dropped == 2


def test_as_output_adapts() -> None:
    assert isinstance(as_output(None), NullSink)
    got: list[bytes] = []
    sink = as_output(got.append)
    assert isinstance(sink, CallbackSink)
    sink.write(b"x")
    assert got == [b"x"]
    stream = as_output(io.BytesIO())
    assert isinstance(stream, StreamSink)
    stream.close()
    with pytest.raises(TypeError):
        as_output(42)  # type: ignore[arg-type]


def test_console_log_is_bounded_and_finds_markers() -> None:
    log = ConsoleLog(capacity=100)
    for i in range(1000):
        log(b"%04d\n" % i)
        assert len(log._buf) <= 2 * log.capacity
    assert log.total == 5000
    assert len(log.data()) == 100
    assert log.data().endswith(b"0999\n")
    assert log.wait_for(b"0998", timeout=0)
    assert not log.wait_for(b"0001", timeout=0)  # evicted
    since = log.total
    assert not log.wait_for(b"0999", timeout=0, since=since)  # only new output counts
    assert log.find(b"0999") == 4995


def test_console_log_wait_across_threads_and_chunk_boundaries() -> None:
    log = ConsoleLog()

    def writer() -> None:
        for c in b"booting...\nWelcome to strato\n":
            log(bytes([c]))

    t = threading.Thread(target=writer)
    t.start()
    assert log.wait_for(b"Welcome to strato", timeout=10)
    t.join()
    assert not log.wait_for(b"never", timeout=0.01)
