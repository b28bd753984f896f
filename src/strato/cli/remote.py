"""`strato-remote`: ch-remote's verbs for strato's (or Cloud Hypervisor's) API socket.

    strato-remote --api-socket /tmp/strato.sock info
    strato-remote --api-socket /tmp/strato.sock create vm.json    # or - for stdin

As ch-remote: a response body is printed as received (JSON), nothing is printed for 204, and
an error prints the server's message chain and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from strato import __version__
from strato.api.client import ApiClient, ApiError

# verb -> (method, endpoint, help)
VERBS: dict[str, tuple[str, str, str]] = {
    "boot": ("PUT", "vm.boot", "Boot a created VM"),
    "counters": ("GET", "vm.counters", "Counters from the VM"),
    "create": ("PUT", "vm.create", "Create VM from a JSON configuration"),
    "delete": ("PUT", "vm.delete", "Delete a VM"),
    "info": ("GET", "vm.info", "Info on the VM"),
    "pause": ("PUT", "vm.pause", "Pause the VM"),
    "ping": ("GET", "vmm.ping", "Ping the VMM to check for API server availability"),
    "power-button": ("PUT", "vm.power-button", "Trigger a power button in the VM"),
    "reboot": ("PUT", "vm.reboot", "Reboot the VM"),
    "resume": ("PUT", "vm.resume", "Resume the VM"),
    "shutdown": ("PUT", "vm.shutdown", "Shutdown the VM"),
    "shutdown-vmm": ("PUT", "vmm.shutdown", "Shutdown the VMM"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"strato-remote: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="strato-remote",
        description="Remotely control a strato (or Cloud Hypervisor) VMM.",
        allow_abbrev=False,
    )
    p.add_argument("--api-socket", required=True, metavar="PATH", help="HTTP API socket path")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help=argparse.SUPPRESS)
    p.add_argument("-V", "--version", action="version", version=f"strato-remote {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="COMMAND", required=True, parser_class=_Parser)
    for verb, (_method, _endpoint, help_text) in VERBS.items():
        sp = sub.add_parser(verb, help=help_text, description=help_text)
        if verb == "create":
            sp.add_argument("path", nargs="?", default="-", help="VmConfig JSON file, - for stdin")
    return p


def _read_config(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    method, endpoint, _help = VERBS[args.verb]
    try:
        body = _read_config(args.path) if args.verb == "create" else None
    except OSError as e:
        print(f"strato-remote: error: cannot read {args.path}: {e.strerror}", file=sys.stderr)
        return 1
    try:
        with ApiClient(args.api_socket, timeout=args.timeout) as api:
            status, reason, data = api.request(method, endpoint, body)
    except OSError as e:
        print(f"strato-remote: error: cannot talk to {args.api_socket}: {e}", file=sys.stderr)
        return 1
    if status >= 300:
        err = ApiError(method, endpoint, status, reason, data)
        print(
            f"strato-remote: error: {method} /api/v1/{endpoint}: the server answered "
            f"{status} {reason}",
            file=sys.stderr,
        )
        lines = err.messages or [data.decode(errors="replace")]
        for i, line in enumerate(lines):
            print(f"  {i}: {line}", file=sys.stderr)
        return 1
    if data:
        sys.stdout.write(data.decode(errors="replace") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
