"""`strato`: boot a VM from Cloud Hypervisor-style flags."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from strato.boot import BootError
from strato.cli.args import build_parser, config_from_args
from strato.kvm import KvmError
from strato.vmm import landlock, seccomp
from strato.vmm.config import ConfigError, VmConfig
from strato.vmm.events import EventMonitor, EventSink
from strato.vmm.stop import EXIT_CONFIG_ERROR, EXIT_VMM_ERROR, STOP_SIGNALS, StopSignals


def setup_logging(verbose: int, log_file: str | None) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("strato: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def confine(
    config: VmConfig,
    extra_paths: list[landlock.Rule] | None = None,
    *,
    process: bool = True,
    landlock_by_default: bool = False,
) -> None:
    """Landlock (with --landlock, or by default where the kernel has it), then the main
    thread's seccomp filter: on the main thread, before any other thread and any guest code;
    every thread created later inherits both. `process=False` (main() called from Python)
    leaves out the main thread's filter and the default landlock, which would outlive the
    call; vCPU and event loop threads still get their filters."""
    seccomp.prepare(config.seccomp)  # loads libseccomp, which landlock would then hide
    if config.landlock or (process and landlock_by_default and landlock.available()):
        landlock.apply(config, extra_paths or [])
    if process:
        seccomp.install("main", config.seccomp)


def event_monitor_rules(ns: argparse.Namespace) -> list[landlock.Rule]:
    """With landlock: the --event-monitor file, opened after confine (its thread is then
    filtered like the others)."""
    monitor = ns.event_monitor or ""
    if monitor.startswith("path=") and len(monitor) > len("path="):
        return [landlock.output_rule(Path(monitor.removeprefix("path=")), "--event-monitor")]
    return []  # fd=N needs no rule; anything else is refused by EventMonitor.from_option


def main(argv: list[str] | None = None, *, confine_process: bool | None = None) -> int:
    """The `strato` command. `confine_process` (default: only when `argv` is None, i.e. run as
    the command) installs the main thread's seccomp filter on the calling process.

    SIGTERM and SIGINT are handled from the first line on (StopSignals): at any point of start,
    run or teardown they stop the VM, and the command ends with its own exit status (0 for a
    stop by signal; the guest's, if it stopped on its own first). Called from Python, the
    previous handlers are put back on return."""
    as_command = argv is None
    if confine_process is None:
        confine_process = as_command
    signals = StopSignals()
    on_main_thread = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if on_main_thread else {}
    if on_main_thread:
        signals.install()
    try:
        return _main(argv, confine_process, signals)
    finally:
        if as_command:
            signals.ignore_from_now()
        else:
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def _main(argv: list[str] | None, confine_process: bool, signals: StopSignals) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_logging(ns.verbose, ns.log_file)
    events: EventSink | None = None
    try:
        config = config_from_args(ns)
        if config.payload.kernel is None and ns.api_socket is None:
            raise ConfigError("--kernel is required (or --api-socket to wait for vm.create)")
        if ns.no_shutdown and ns.api_socket is None:
            raise ConfigError(
                "--no-shutdown: only with --api-socket (it keeps the VMM serving the API after "
                "the guest stops; without the API, strato exits when the guest stops)"
            )
        if ns.api_socket is not None:
            from strato.api.server import api_socket_target, prebind
            from strato.cli.api_mode import run_api_mode

            # Bound before confining: landlock gives no right on the socket's directory, and
            # the main seccomp filter has no bind or connect (the stale-socket probe).
            if isinstance(target := api_socket_target(ns.api_socket), Path):
                prebind(target)
            rules = event_monitor_rules(ns) if config.landlock else []
            confine(config, rules, process=confine_process)
            return run_api_mode(ns, config if config.payload.kernel is not None else None, signals)
        config.validate()
        from strato.vmm.runner import run

        confine(config, event_monitor_rules(ns), process=confine_process,
                landlock_by_default=ns.landlock is None)  # fmt: skip
        # Opened after confine: its writer thread starts under the main thread's filter.
        events = EventMonitor.from_option(ns.event_monitor) if ns.event_monitor else None
        if events is not None:
            events.emit("vmm", "starting")
        stop = run(config, signals=signals, events=events)
    except (ConfigError, BootError) as e:
        print(f"strato: error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except seccomp.SeccompError as e:
        print(f"strato: error: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    except KvmError as e:
        print(f"strato: error: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    finally:
        if events is not None:
            events.emit("vmm", "shutdown")
            events.close()
    # A crash was already reported on stderr, once, by the VM's stop log line.
    return stop.exit_status


if __name__ == "__main__":
    sys.exit(main())
