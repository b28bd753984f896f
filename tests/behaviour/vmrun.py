"""The built-in guest in this process, with the `Vm` at hand while it runs.

`boot(args, ...)` runs `strato.vmm.runner.run` on the machine the `strato` flags `args`
describe (parsed by strato's own argument parser). Serial lines are parsed as they arrive;
every event (TEST, READY, BENCH-START, ...) goes to `on_event(event, boot)` on a thread of
its own, never on the vCPU thread that printed it, with the `Boot` that printed it: its `Vm`
(a guest reset starts a new boot and a new `Vm`), its index and its output so far.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from tests.guest.harness import Event, GuestOutput

if TYPE_CHECKING:
    from strato.vmm.stop import Stop
    from strato.vmm.vm import Vm


@dataclass
class Boot:
    vm: Vm
    index: int
    output: GuestOutput = field(default_factory=GuestOutput)


EventAction = Callable[[Event, Boot], None]


@dataclass
class Run:
    boots: list[Boot]
    stop: Stop
    errors: list[str]
    seconds: float

    @property
    def output(self) -> GuestOutput:
        """The last boot's output."""
        return self.boots[-1].output

    def text(self) -> str:
        return "\n".join(f"--- boot {i} ---\n{b.output.text()}" for i, b in enumerate(self.boots))


def boot(
    args: Sequence[str],
    *,
    timeout: float,
    on_event: EventAction | None = None,
    max_boots: int = 4,
) -> Run:
    from strato.cli.args import build_parser, config_from_args
    from strato.devices.legacy.serial_output import CallbackSink
    from strato.vmm.config import ConsoleConfig, ConsoleMode
    from strato.vmm.runner import run

    config = config_from_args(build_parser().parse_args(list(args)))
    # Serial bytes come to our callback; NULL (not OFF) keeps the 16550 and opens no tty.
    config = replace(config, serial=ConsoleConfig(ConsoleMode.NULL))
    boots: list[Boot] = []
    events: queue.Queue[tuple[Event, int] | None] = queue.Queue()
    errors: list[str] = []
    pending = bytearray()
    start = time.monotonic()

    def on_serial(data: bytes) -> None:  # a vCPU thread: parse only
        pending.extend(data)
        while (nl := pending.find(b"\n")) >= 0:
            line = pending[:nl].decode("utf-8", "replace").rstrip("\r")
            del pending[: nl + 1]
            index = len(boots) - 1
            event = boots[index].output.add(line, time.monotonic() - start)
            if event is not None:
                events.put((event, index))

    def dispatch() -> None:
        while (item := events.get()) is not None:
            event, index = item
            if on_event is None:
                continue
            try:
                on_event(event, boots[index])
            except Exception as e:  # reported by the test, not lost on a thread
                errors.append(f"{event}: {e!r}")

    def started(vm: Vm) -> None:
        pending.clear()
        boots.append(Boot(vm, len(boots)))

    worker = threading.Thread(target=dispatch, name="guest-events", daemon=True)
    worker.start()
    try:
        stop = run(
            config,
            serial_out=CallbackSink(on_serial),
            on_started=started,
            timeout=timeout,
            max_reboots=max_boots - 1,
        )
    finally:
        events.put(None)
        worker.join(timeout=30)
    if pending and boots:
        boots[-1].output.add(pending.decode("utf-8", "replace"), time.monotonic() - start)
    return Run(boots, stop, errors, time.monotonic() - start)
