"""`strato` with time stamps: run as `python bench/strato_probe.py STRATO-ARGS...`.

Prints `STRATO-PROBE <step> <CLOCK_MONOTONIC ns>` lines on stderr as start-up goes on: the
interpreter is ready (site included), strato's command line and VMM modules are imported, and
every step of `strato.vmm.builder.BootTimes` (config, vm, devices, load, vcpus, first KVM_RUN).
CLOCK_MONOTONIC is one clock for every process, so the launcher subtracts its own launch time.
"""

import time

T_READY = time.monotonic_ns()

import sys  # noqa: E402


def emit(step: str, ns: int) -> None:
    sys.stderr.write(f"STRATO-PROBE {step} {ns}\n")
    sys.stderr.flush()


def main() -> int:
    emit("interpreter", T_READY)
    import strato.cli.main as cli
    import strato.vmm.runner as runner
    from strato.vmm.builder import BootTimes

    emit("imports", time.monotonic_ns())

    class ProbeTimes(BootTimes):
        def __init__(self) -> None:
            super().__init__()
            emit("config", self.start)

        def mark(self, step: str) -> None:
            super().mark(step)
            emit(step, self.steps[-1][1])

    setattr(runner, "BootTimes", ProbeTimes)  # noqa: B010 (runner looks it up by name)
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
