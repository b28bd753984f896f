"""`strato`: boot a VM from Cloud Hypervisor-style flags."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from strato.boot import BootError
from strato.cli.args import build_parser, config_from_args
from strato.kvm import KvmError
from strato.vmm import landlock, seccomp
from strato.vmm.config import ConfigError, VmConfig
from strato.vmm.stop import EXIT_CONFIG_ERROR, EXIT_VMM_ERROR


def setup_logging(verbose: int, log_file: str | None) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("strato: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def confine(
    config: VmConfig, extra_paths: list[landlock.Rule] | None = None, *, process: bool = True
) -> None:
    """Landlock (with --landlock), then the main thread's seccomp filter: on the main thread,
    before any other thread and any guest code; every thread created later inherits both.
    `process=False` (main() called from Python) leaves out the main thread's filter, which
    would outlive the call; vCPU and event loop threads still get theirs."""
    seccomp.prepare(config.seccomp)  # loads libseccomp, which landlock would then hide
    if config.landlock:
        landlock.apply(config, extra_paths or [])
    if process:
        seccomp.install("main", config.seccomp)


def api_mode_rules(ns: argparse.Namespace) -> list[landlock.Rule]:
    from strato.api.server import api_socket_target

    rules: list[landlock.Rule] = []
    target = api_socket_target(ns.api_socket)
    if isinstance(target, Path):
        rules += landlock.api_socket_rules(target)
    monitor = ns.event_monitor or ""
    if monitor and not monitor.startswith("fd="):
        rules.append(landlock.output_rule(Path(monitor.removeprefix("path=")), "--event-monitor"))
    return rules


def main(argv: list[str] | None = None, *, confine_process: bool | None = None) -> int:
    """The `strato` command. `confine_process` (default: only when `argv` is None, i.e. run as
    the command) installs the main thread's seccomp filter on the calling process."""
    if confine_process is None:
        confine_process = argv is None
    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_logging(ns.verbose, ns.log_file)
    try:
        config = config_from_args(ns)
        if config.payload.kernel is None and ns.api_socket is None:
            raise ConfigError("--kernel is required (or --api-socket to wait for vm.create)")
        if ns.api_socket is not None:
            from strato.cli.api_mode import run_api_mode

            rules = api_mode_rules(ns) if config.landlock else []
            confine(config, rules, process=confine_process)
            return run_api_mode(ns, config if config.payload.kernel is not None else None)
        config.validate()
        from strato.vmm.runner import run

        confine(config, process=confine_process)
        stop = run(config, handle_signals=True)
    except (ConfigError, BootError) as e:
        print(f"strato: error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except seccomp.SeccompError as e:
        print(f"strato: error: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    except KvmError as e:
        print(f"strato: error: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    except KeyboardInterrupt:
        return 130
    # A crash was already reported on stderr, once, by the VM's stop log line.
    return stop.exit_status


if __name__ == "__main__":
    sys.exit(main())
