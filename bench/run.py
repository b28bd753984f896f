"""Run the strato-vs-QEMU benchmark suite, write the results, regenerate the README table and plots.

    python -m bench.run            # start-up, memory, exits, block, network (network: root only)
    python -m bench.run --quick    # the same, one short run each (a smoke run, minutes)
    python -m bench.run --linux    # only the Debian kernel boot (minutes per boot here)
    python -m bench.run --all      # everything, Linux included
    python -m bench.run --only exits,block --runs 5

Results go to bench/results/run-<time>.json; bench/results/latest.json keeps the newest result
of every benchmark (a run of some benchmarks replaces only theirs, so the Linux row stays from
the last --linux run). bench/README.md's table and bench/plots/ are regenerated from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import block, exits, linux, memory, network, startup
from bench.common import RESULTS, Results, log
from bench.report import regenerate
from tests.guest.qemu import kvm_usable, qemu_path

DEFAULT = ("startup", "memory", "exits", "block", "network")
ALL = (*DEFAULT, "linux")


def plan(quick: bool, runs: int | None) -> dict[str, Callable[[Results], None]]:
    """What each benchmark runs with: short single runs for --quick, medians of several else."""
    n = runs
    if quick:
        return {
            "startup": lambda r: startup.run(r, n or 2),
            "memory": lambda r: memory.run(r, n or 1, sizes_mib=(128,)),
            "exits": lambda r: exits.run(r, n or 1, count=20_000),
            "block": lambda r: block.run(r, n or 1, seconds=1),
            "network": lambda r: network.run(r, n or 1, seconds=1),
            "linux": lambda r: linux.run(r, n or 1),
        }
    return {
        "startup": lambda r: startup.run(r, n or 10),
        "memory": lambda r: memory.run(r, n or 3),
        "exits": lambda r: exits.run(r, n or 3),
        "block": lambda r: block.run(r, n or 3),
        "network": lambda r: network.run(r, n or 3),
        "linux": lambda r: linux.run(r, n or 1),
    }


def merge_latest(run: dict[str, Any], latest: Path) -> dict[str, Any]:
    """The previous latest results with this run's benchmarks replaced by the new ones."""
    measured = {b: run["started"] for b in {r["bench"] for r in run["results"]}}
    if latest.exists():
        old = json.loads(latest.read_text())
        keep = [r for r in old.get("results", []) if r["bench"] not in measured]
        old_measured = {b: t for b, t in old.get("measured", {}).items() if b not in measured}
        if not old_measured:  # files from before "measured" existed
            old_measured = {r["bench"]: old.get("started", "?") for r in keep}
        details = {**old.get("details", {}), **run["details"]}
    else:
        keep, old_measured, details = [], {}, run["details"]
    merged = dict(run)
    merged["results"] = keep + run["results"]
    merged["measured"] = {**old_measured, **measured}
    merged["details"] = details
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one short run of each benchmark")
    mode.add_argument("--all", action="store_true", help="every benchmark, Linux boot included")
    mode.add_argument("--linux", action="store_true", help="only the Linux boot")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--runs", type=int, default=None, help="alternated runs per VMM")
    ap.add_argument("--label", default="", help="added to the results file name")
    ap.add_argument("--out", type=Path, default=None, help="results file (default: run-<time>)")
    ap.add_argument("--no-report", action="store_true", help="do not touch README.md and plots")
    args = ap.parse_args(argv)

    if not kvm_usable() or qemu_path() is None:
        print(
            "bench: needs /dev/kvm and qemu-system-x86_64 (apt-get install qemu-system-x86)",
            file=sys.stderr,
        )
        return 2
    names = ALL if args.all else ("linux",) if args.linux else DEFAULT
    if args.only:
        names = tuple(n.strip() for n in args.only.split(",") if n.strip())
        unknown = [n for n in names if n not in ALL]
        if unknown:
            ap.error(f"unknown benchmark(s) {unknown}; choose from {','.join(ALL)}")
    mode_name = "quick" if args.quick else "all" if args.all else "linux" if args.linux else "full"
    results = Results(mode_name + (f" {args.label}" if args.label else ""))
    steps = plan(args.quick, args.runs)
    failed: list[str] = []
    for name in names:
        t0 = time.monotonic()
        try:
            steps[name](results)
        except Exception as e:  # one broken benchmark must not lose the others' results
            log(f"{name}: FAILED: {e}")
            results.details.setdefault("failures", {})[name] = str(e)[-4000:]
            failed.append(name)
        log(f"{name}: {time.monotonic() - t0:.0f} s")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS / f"run-{stamp}{'-' + args.label if args.label else ''}.json"
    results.write(out)
    latest = RESULTS / "latest.json"
    latest.write_text(json.dumps(merge_latest(json.loads(out.read_text()), latest), indent=2))
    log(f"results: {out} (merged into {latest})")
    for r in results.items:
        adv = r.advantage
        print(
            f"{r.bench:8s} {r.case:24s} {r.metric:28s} strato {r.strato_median!s:>12.12} "
            f"qemu {r.qemu_median!s:>12.12}  advantage {adv if adv is None else round(adv, 3)}"
        )
    if not args.no_report:
        before = RESULTS / "before.json"
        regenerate(latest, before if before.exists() else None)
        log("bench/README.md and bench/plots/ regenerated")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
