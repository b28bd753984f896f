"""Reading the built-in guest's serial output; shared by the QEMU and the strato tests.

The guest prints one event per line on COM1 (see guest/README.md):

    TEST <name> PASS|FAIL|SKIP <detail>
    BENCH-START <name> [key=value ...]
    BENCH-END <name> ops=<n> bytes=<n> [key=value ...]
    READY <what> [key=value ...]
    DONE pass=<n> fail=<n> [skip=<n>]
    FATAL <message>

`parse_line` turns one line into an event, `GuestOutput` collects a run, and
`run_guest` starts any VMM whose serial port is its stdout, answers READY
lines through callbacks, and stops at DONE or a deadline.
"""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.guest.hostnet import rx_test_frame

_KV = re.compile(r"([A-Za-z0-9_.-]+)=(\"[^\"]*\"|\S*)")
# Firmware may leave a partial line on the port, so an event may start mid-line.
_EVENT = re.compile(r"(TEST|BENCH-START|BENCH-END|READY|DONE|FATAL)(?= |$)(.*)$")


def parse_fields(text: str) -> dict[str, str]:
    """`key=value` pairs in `text` (quoted values lose their quotes)."""
    fields: dict[str, str] = {}
    for key, value in _KV.findall(text):
        fields[key] = value[1:-1] if value.startswith('"') else value
    return fields


@dataclass(frozen=True)
class TestLine:
    __test__ = False  # not a pytest test class

    name: str
    passed: bool
    detail: str
    fields: dict[str, str]
    t: float = 0.0
    skipped: bool = False  # a SKIP line: the check did not run (`passed` is False)

    def __str__(self) -> str:
        verdict = "SKIP" if self.skipped else "PASS" if self.passed else "FAIL"
        return f"TEST {self.name} {verdict} {self.detail}"


@dataclass(frozen=True)
class BenchStart:
    name: str
    fields: dict[str, str]
    t: float = 0.0


@dataclass(frozen=True)
class BenchEnd:
    name: str
    ops: int
    bytes: int
    fields: dict[str, str]
    t: float = 0.0


@dataclass(frozen=True)
class Ready:
    what: str
    fields: dict[str, str]
    t: float = 0.0


@dataclass(frozen=True)
class Done:
    passed: int
    failed: int
    t: float = 0.0
    skipped: int = 0


@dataclass(frozen=True)
class Fatal:
    message: str
    t: float = 0.0


Event = TestLine | BenchStart | BenchEnd | Ready | Done | Fatal


def parse_line(line: str, t: float = 0.0) -> Event | None:
    """One serial line -> an event, or None for any other output."""
    m = _EVENT.search(line.rstrip("\r\n"))
    if not m:
        return None
    kind, rest = m.group(1), m.group(2).strip()
    words = rest.split(None, 1)
    head = words[0] if words else ""
    tail = words[1] if len(words) > 1 else ""
    if kind == "TEST":
        verdict, _, detail = tail.partition(" ")
        if not head or verdict not in ("PASS", "FAIL", "SKIP"):
            return None
        fields = parse_fields(detail)
        return TestLine(head, verdict == "PASS", detail.strip(), fields, t, verdict == "SKIP")
    if kind == "BENCH-START" and head:
        return BenchStart(head, parse_fields(tail), t)
    if kind == "BENCH-END" and head:
        fields = parse_fields(tail)
        try:
            return BenchEnd(head, int(fields["ops"]), int(fields["bytes"]), fields, t)
        except (KeyError, ValueError):
            return None
    if kind == "READY" and head:
        return Ready(head, parse_fields(tail), t)
    if kind == "DONE":
        fields = parse_fields(rest)
        try:
            return Done(int(fields["pass"]), int(fields["fail"]), t, int(fields.get("skip", "0")))
        except (KeyError, ValueError):
            return None
    if kind == "FATAL":
        return Fatal(rest, t)
    return None


@dataclass(frozen=True)
class BenchResult:
    """A workload between its BENCH-START and BENCH-END lines, timed by the host."""

    name: str
    ops: int
    bytes: int
    seconds: float
    fields: dict[str, str]

    @property
    def ops_per_second(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass
class GuestOutput:
    """Everything one guest run printed, parsed as it arrives."""

    lines: list[str] = field(default_factory=list)
    tests: list[TestLine] = field(default_factory=list)  # PASS and FAIL lines
    skipped: list[TestLine] = field(default_factory=list)  # SKIP lines
    benches: list[BenchResult] = field(default_factory=list)
    ready: list[Ready] = field(default_factory=list)
    fatal: list[Fatal] = field(default_factory=list)
    done: Done | None = None
    _open_bench: BenchStart | None = None

    def add(self, line: str, t: float = 0.0) -> Event | None:
        self.lines.append(line)
        event = parse_line(line, t)
        if isinstance(event, TestLine):
            (self.skipped if event.skipped else self.tests).append(event)
        elif isinstance(event, BenchStart):
            self._open_bench = event
        elif isinstance(event, BenchEnd):
            start = self._open_bench
            seconds = event.t - start.t if start and start.name == event.name else 0.0
            fields = {**(start.fields if start else {}), **event.fields}
            self.benches.append(BenchResult(event.name, event.ops, event.bytes, seconds, fields))
            self._open_bench = None
        elif isinstance(event, Ready):
            self.ready.append(event)
        elif isinstance(event, Done):
            self.done = event
        elif isinstance(event, Fatal):
            self.fatal.append(event)
        return event

    @classmethod
    def parse(cls, text: str) -> GuestOutput:
        out = cls()
        for line in text.splitlines():
            out.add(line)
        return out

    def failures(self) -> list[TestLine]:
        return [t for t in self.tests if not t.passed]

    def named(self, name: str) -> list[TestLine]:
        return [t for t in self.tests if t.name == name]

    def result(self, name: str) -> TestLine:
        """The only TEST line called `name` (AssertionError with the output otherwise)."""
        found = self.named(name)
        assert len(found) == 1, f"expected one TEST {name} line, got {len(found)}:\n{self.text()}"
        return found[0]

    def text(self) -> str:
        return "\n".join(self.lines)

    def check(self, required: Sequence[str] = ()) -> None:
        """Assert a clean run: DONE, no FATAL, no failed TEST, every `required` name present."""
        problems = [str(t) for t in self.failures()]
        problems += [f"FATAL {f.message}" for f in self.fatal]
        names = {t.name for t in self.tests}
        problems += [f"no TEST {name} line" for name in required if name not in names]
        if self.done is None:
            problems.append("no DONE line")
        elif self.done.failed or self.done.passed != len(self.tests) - len(self.failures()):
            problems.append(f"DONE pass={self.done.passed} fail={self.done.failed}")
        assert not problems, (
            "guest run failed:\n  "
            + "\n  ".join(problems)
            + ("\n--- serial output ---\n" + self.text())
        )


@dataclass
class RunResult:
    output: GuestOutput
    returncode: int | None  # None: killed at the deadline
    seconds_to_done: float | None  # from process start to the DONE line
    seconds_total: float
    stderr: str


ReadyHandler = Callable[[Ready], None]

# What the host answers READY lines with (the guest's checks expect exactly this).
CONSOLE_INPUT = "hello-from-host 42"
RX_SIZES = (60, 200, 1514, 100)
RX_BENCH_FRAMES = 200  # fewer than a 256-entry receive ring holds: none can be dropped


@dataclass
class HostResponder:
    """Answers the guest's READY lines; records what it sent.

    `send_frame` puts a frame on the guest's network (e.g. PacketCapture.send on its tap),
    `console_write` writes to the guest's virtio console.
    """

    send_frame: Callable[[bytes], None] | None = None
    console_write: Callable[[bytes], None] | None = None
    rx_frames_sent: int = 0
    rx_bench_frames: int = RX_BENCH_FRAMES

    def net_rx(self, ready: Ready) -> None:
        assert self.send_frame is not None
        for seq in range(int(ready.fields.get("frames", "4"))):
            size = RX_SIZES[seq % len(RX_SIZES)]
            self.send_frame(rx_test_frame(ready.fields["mac"], seq, size))
            self.rx_frames_sent += 1

    def net_rx_bench(self, ready: Ready) -> None:
        assert self.send_frame is not None
        for seq in range(self.rx_bench_frames):
            self.send_frame(rx_test_frame(ready.fields["mac"], seq, 64, tag="RXB"))
        self.send_frame(rx_test_frame(ready.fields["mac"], 0, 64, tag="END"))

    def console_rx(self, _ready: Ready) -> None:
        assert self.console_write is not None
        self.console_write(CONSOLE_INPUT.encode() + b"\n")

    def handlers(self) -> dict[str, ReadyHandler]:
        handlers: dict[str, ReadyHandler] = {}
        if self.send_frame is not None:
            handlers["net-rx"] = self.net_rx
            handlers["net-rx-bench"] = self.net_rx_bench
        if self.console_write is not None:
            handlers["console-rx"] = self.console_rx
        return handlers


def run_guest(
    argv: Sequence[str],
    timeout: float,
    on_ready: Mapping[str, ReadyHandler] | None = None,
    exit_grace: float = 10.0,
    env: Mapping[str, str] | None = None,
    after_start: Callable[[], object] | None = None,
) -> RunResult:
    """Run a VMM whose stdout is the guest's serial port until DONE (or `timeout`).

    READY lines are answered by `on_ready[what]`. After DONE the process gets
    `exit_grace` seconds to exit by itself (the guest asks the VMM to stop),
    then it is killed and `returncode` is None. `after_start` runs once the
    process exists (to connect to its sockets, for example).
    """
    output = GuestOutput()
    start = time.monotonic()
    deadline = start + timeout
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=None if env is None else dict(env),
    )
    assert proc.stdout is not None and proc.stderr is not None
    stderr_chunks: list[bytes] = []
    pending = b""
    done_at: float | None = None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    open_streams = 2
    try:
        if after_start is not None:
            after_start()
        while open_streams:
            now = time.monotonic()
            limit = deadline if done_at is None else min(deadline, done_at + exit_grace)
            if now >= limit:
                break
            for key, _ in sel.select(timeout=min(0.5, limit - now)):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                if key.data == "err":
                    stderr_chunks.append(data)
                    continue
                pending += data
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    t = time.monotonic() - start
                    event = output.add(raw.decode("utf-8", "replace").rstrip("\r"), t)
                    if isinstance(event, Done) and done_at is None:
                        done_at = time.monotonic()
                    if isinstance(event, Ready) and on_ready and event.what in on_ready:
                        on_ready[event.what](event)
        if pending:
            output.add(pending.decode("utf-8", "replace"), time.monotonic() - start)
        try:
            returncode: int | None = proc.wait(
                timeout=max(0.1, (done_at or 0) + exit_grace - time.monotonic())
            )
        except subprocess.TimeoutExpired:
            returncode = None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    return RunResult(
        output=output,
        returncode=returncode,
        seconds_to_done=None if done_at is None else done_at - start,
        seconds_total=time.monotonic() - start,
        stderr=b"".join(stderr_chunks).decode("utf-8", "replace"),
    )


# ---- the block test's data ----------------------------------------------------------------
def _mix(x: int) -> int:
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def blk_pattern(seed: int, sector: int) -> bytes:
    """The 512 bytes the guest's blk-rw test writes to `sector` (guest/lib.c pattern_word)."""
    base = (seed ^ ((sector * 0x9E3779B1) & 0xFFFFFFFF)) & 0xFFFFFFFF
    words = (_mix(base ^ ((i * 0x85EBCA6B) & 0xFFFFFFFF)) for i in range(128))
    return b"".join(w.to_bytes(4, "little") for w in words)


def check_blk_disk(disk: Path, line: TestLine) -> list[int]:
    """Sectors of `disk` that do not hold what a passing blk-rw line says was written."""
    seed = int(line.fields["seed"], 16)
    bad: list[int] = []
    with open(disk, "rb") as f:
        for extent in line.fields["written"].split(","):
            first, count = (int(v) for v in extent.split(":"))
            for sector in range(first, first + count):
                f.seek(sector * 512)
                if f.read(512) != blk_pattern(seed, sector):
                    bad.append(sector)
    return bad
