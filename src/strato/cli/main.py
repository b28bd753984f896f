"""`strato`: boot a VM from Cloud Hypervisor-style flags."""

from __future__ import annotations

import logging
import sys

from strato.boot import BootError
from strato.cli.args import build_parser, config_from_args
from strato.kvm import KvmError
from strato.vmm.config import ConfigError
from strato.vmm.stop import EXIT_CONFIG_ERROR, EXIT_VMM_ERROR


def setup_logging(verbose: int, log_file: str | None) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("strato: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_logging(ns.verbose, ns.log_file)
    try:
        config = config_from_args(ns)
        if config.payload.kernel is None and ns.api_socket is None:
            raise ConfigError("--kernel is required (or --api-socket to wait for vm.create)")
        if ns.api_socket is not None:
            from strato.cli.api_mode import run_api_mode

            return run_api_mode(ns, config if config.payload.kernel is not None else None)
        config.validate()
        from strato.vmm.runner import run

        stop = run(config, handle_signals=True)
    except (ConfigError, BootError) as e:
        print(f"strato: error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except KvmError as e:
        print(f"strato: error: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    except KeyboardInterrupt:
        return 130
    # A crash was already reported on stderr, once, by the VM's stop log line.
    return stop.exit_status


if __name__ == "__main__":
    sys.exit(main())
