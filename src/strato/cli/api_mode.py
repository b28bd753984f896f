"""`strato --api-socket ...`: serve Cloud Hypervisor's REST API, with or without a VM given on
the command line (without one, the VMM waits for `vm.create`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from strato.api.server import api_socket_target, serve_api
from strato.vmm import seccomp
from strato.vmm.config import ConfigError, VmConfig
from strato.vmm.controller import Action, ManagedVm, VmmController, VmmError
from strato.vmm.events import EventMonitor
from strato.vmm.platform import warn_if_emulated
from strato.vmm.runner import terminal_input
from strato.vmm.stop import EXIT_CONFIG_ERROR, EXIT_OK, EXIT_VMM_ERROR, StopSignals

WAIT_SLICE = 0.2  # seconds: how often the main thread looks at a received SIGTERM/SIGINT


def run_api_mode(
    ns: argparse.Namespace, config: VmConfig | None, signals: StopSignals | None = None
) -> int:
    """Serve the API until `vmm.shutdown`, the guest's stop (without --no-shutdown), or
    SIGTERM/SIGINT (`signals`, installed by the caller): a signal shuts the VMM down as
    `vmm.shutdown` does, from this thread, never from the handler."""
    signals = signals or StopSignals()
    if signals.stop is not None:
        return EXIT_OK
    warn_if_emulated()
    events = EventMonitor.from_option(ns.event_monitor) if ns.event_monitor else None

    def on_vm_start(vm: ManagedVm) -> Callable[[], None] | None:
        cfg = controller.config
        pump = terminal_input(cfg, vm) if cfg is not None else None
        return pump.stop if pump is not None else None

    controller = VmmController(
        events=events, no_shutdown=ns.no_shutdown, on_vm_start=on_vm_start, seccomp=ns.seccomp
    )
    controller.start()
    try:
        target = api_socket_target(ns.api_socket)
        server = serve_api(
            controller, target, on_thread_start=seccomp.thread_hook("api", ns.seccomp)
        )
    except (ValueError, OSError) as e:
        controller.close()
        raise ConfigError(f"--api-socket {ns.api_socket}: {e}") from None
    try:
        if config is not None:
            try:
                controller.create(config)
                controller.boot()
            except VmmError as e:
                print(f"strato: error: {e}", file=sys.stderr)
                return EXIT_CONFIG_ERROR if e.status == 400 else EXIT_VMM_ERROR
        shutting_down = False
        while not controller.wait(WAIT_SLICE):
            if signals.stop is not None and not shutting_down:
                controller.submit(Action.SHUTDOWN_VMM)
                shutting_down = True
    finally:
        server.close()
        controller.close()
    return controller.exit_status
