"""``python -m strato.images``: build the default guest if needed and print its paths."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from strato.images.errors import ImageError
from strato.images.initramfs import ensure_default_guest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m strato.images",
        description="Fetch Debian's cloud kernel and busybox (cached per user) and build "
        "strato's default guest initramfs; print where they are.",
    )
    parser.add_argument("--cache-dir", type=Path, help="default: $XDG_CACHE_HOME/strato")
    parser.add_argument(
        "--refresh", action="store_true", help="ask apt for newer packages than the cached ones"
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON object")
    out.add_argument("--shell", action="store_true", help="print KEY='value' lines for eval")
    args = parser.parse_args(argv)

    start = time.monotonic()
    try:
        guest = ensure_default_guest(args.cache_dir, refresh=args.refresh)
    except ImageError as e:
        print(f"strato.images: {e}", file=sys.stderr)
        return 1
    fields = {
        "kernel_version": guest.kernel.version,
        "bzimage": str(guest.kernel.bzimage),
        "vmlinux": str(guest.kernel.vmlinux),
        "modules_dir": str(guest.kernel.modules_dir),
        "initramfs": str(guest.initramfs),
        "cmdline": guest.cmdline,
        "marker": guest.marker,
    }
    if args.json:
        print(json.dumps(fields, indent=2))
    elif args.shell:
        for key, value in fields.items():
            print(f"STRATO_{key.upper()}={shlex.quote(value)}")
    else:
        width = max(map(len, fields))
        for key, value in fields.items():
            print(f"{key:<{width}}  {value}")
        print(f"({time.monotonic() - start:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
