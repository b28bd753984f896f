"""What every benchmark shares: the two VMMs' command lines, alternation, medians, result records,
the machine and version description, and the files both VMMs are given."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.guest.qemu import QBOOT, QemuMachine, qemu_path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PLOTS = BENCH / "plots"
WORK = Path("/var/tmp") / f"strato-bench-{os.getuid()}"  # same disk for every file both use
MiB = 1 << 20
VMMS = ("strato", "qemu")


# ---- results ---------------------------------------------------------------------------------
@dataclass
class Result:
    """One metric of one case, measured on both VMMs (every run kept; medians compared)."""

    bench: str  # startup, memory, exits, block, network, linux
    case: str  # e.g. "randread 4k qd1"
    metric: str  # e.g. "IOPS"
    unit: str
    better: str  # "lower" or "higher"
    strato: list[float] = field(default_factory=list)
    qemu: list[float] = field(default_factory=list)
    host: list[float] = field(default_factory=list)  # the host's own limit, where there is one
    goal: str = ""  # what the issue asks of this metric, in words
    note: str = ""

    @property
    def strato_median(self) -> float | None:
        return median(self.strato)

    @property
    def qemu_median(self) -> float | None:
        return median(self.qemu)

    @property
    def host_median(self) -> float | None:
        return median(self.host)

    @property
    def ratio(self) -> float | None:
        """strato / QEMU of the medians."""
        s, q = self.strato_median, self.qemu_median
        if s is None or q is None or q == 0:
            return None
        return s / q

    @property
    def advantage(self) -> float | None:
        """How many times better strato is (> 1: strato wins), whichever way the metric goes."""
        r = self.ratio
        if r is None or r == 0:
            return None
        return r if self.better == "higher" else 1 / r

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            strato_median=self.strato_median,
            qemu_median=self.qemu_median,
            host_median=self.host_median,
            ratio=self.ratio,
            advantage=self.advantage,
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


def median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


class Results:
    """The results of one suite run, with the machine and versions they were measured on."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.items: list[Result] = []
        self.details: dict[str, Any] = {}
        self.environment = environment()

    def add(self, result: Result) -> Result:
        self.items.append(result)
        return result

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": "strato-vs-qemu",
            "mode": self.mode,
            "started": self.started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": self.environment,
            "results": [r.to_dict() for r in self.items],
            "details": self.details,
        }

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")


# ---- alternation -----------------------------------------------------------------------------
def alternate(runs: int, work: Callable[[str, int], None], vmms: Sequence[str] = VMMS) -> None:
    """Call work(vmm, i) `runs` times for each VMM, alternating and flipping the order each
    round (s q, q s, s q, ...) so that slow phases of a noisy machine hit both alike."""
    for i in range(runs):
        order = list(vmms) if i % 2 == 0 else list(reversed(vmms))
        for vmm in order:
            work(vmm, i)


# ---- the machine and the versions ------------------------------------------------------------
def _first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.strip().splitlines()[0] if out.strip() else ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment() -> dict[str, Any]:
    from strato.vmm.platform import kvm_emulates_kernel_mode

    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = bool(_first_line(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"]))
    try:
        from importlib.metadata import version

        strato_version = version("strato")
    except Exception:
        strato_version = "?"
    return {
        "strato": f"{strato_version} ({commit}{'+local changes' if dirty else ''})"
        + (f" from {os.environ['STRATO_BENCH_SRC']}" if os.environ.get("STRATO_BENCH_SRC") else ""),
        "qemu": _first_line([qemu_path() or "qemu-system-x86_64", "--version"]),
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kvm": "nested on PVM (guest CPL 0 emulated)" if kvm_emulates_kernel_mode() else "KVM",
        "load_average": os.getloadavg(),
    }


# ---- guests and files ------------------------------------------------------------------------
def builtin_guest() -> Path:
    from strato.images.builtin import ensure_builtin_guest

    return ensure_builtin_guest()


def startup_guest() -> Path:
    """bench/guests/startup.S, assembled with tests/guests/pvh_common.S (cached by mtime)."""
    src = BENCH / "guests" / "startup.S"
    common = ROOT / "tests" / "guests"
    out_dir = WORK / "guests"
    out_dir.mkdir(parents=True, exist_ok=True)
    obj, elf = out_dir / "startup.o", out_dir / "startup.elf"
    newest = max(p.stat().st_mtime for p in (src, common / "pvh_common.S", common / "pvh.ld"))
    if not elf.exists() or elf.stat().st_mtime < newest:
        if shutil.which("as") is None or shutil.which("ld") is None:
            raise RuntimeError("GNU binutils (as, ld) are needed to build the start-up guest")
        subprocess.run(["as", "--64", "-I", str(common), "-o", str(obj), str(src)], check=True)
        ld = ["ld", "-m", "elf_x86_64", "-T", str(common / "pvh.ld"), "-o", str(elf), str(obj)]
        subprocess.run(ld, check=True)
    return elf


def disk_image(size_mib: int, name: str = "disk.raw") -> Path:
    """A raw image full of random data (no holes: reads touch real blocks), reused across runs."""
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / name
    if path.exists() and path.stat().st_size == size_mib * MiB:
        return path
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return path


# ---- command lines ---------------------------------------------------------------------------
@dataclass
class Vm:
    """What a benchmark boots; rendered for each VMM by `command(vmm)`."""

    kernel: Path
    cmdline: str = ""
    memory_mib: int = 256
    cpus: int = 1
    disk: Path | None = None
    rng: bool = False
    tap: str | None = None
    mac: str = "52:54:00:12:34:56"
    initramfs: Path | None = None
    qemu_machine: str = "q35"  # q35 (with qboot when installed) or microvm
    strato_extra: list[str] = field(default_factory=list)

    def strato(self, python: Iterable[str] = ()) -> list[str]:
        args = [
            sys.executable, *python, "-m", "strato.cli.main",
            "--kernel", str(self.kernel),
            "--cmdline", self.cmdline,
            "--cpus", f"boot={self.cpus}",
            "--memory", f"size={self.memory_mib}M",
            "--serial", "tty",
            "--console", "off",
            "--no-reboot",
        ]  # fmt: skip
        if self.initramfs is not None:
            args += ["--initramfs", str(self.initramfs)]
        if self.disk is not None:
            args += ["--disk", f"path={self.disk},serial=strato-disk0"]
        if self.rng:
            args += ["--rng", "src=/dev/urandom"]
        if self.tap is not None:
            args += ["--net", f"tap={self.tap},mac={self.mac}"]
        return args + self.strato_extra

    def qemu(self) -> list[str]:
        m = QemuMachine(
            kernel=self.kernel,
            append=self.cmdline,
            firmware="qboot" if self.qemu_machine == "q35" and QBOOT.is_file() else "seabios",
            memory_mib=self.memory_mib,
            cpus=self.cpus,
            disk=self.disk,
            rng=self.rng,
            tap=self.tap,
            mac=self.mac,
        )
        cmd = m.command()
        if self.qemu_machine != "q35":
            cmd[cmd.index("q35")] = self.qemu_machine
        if self.initramfs is not None:
            cmd += ["-initrd", str(self.initramfs)]
        return cmd

    def command(self, vmm: str) -> list[str]:
        return self.strato() if vmm == "strato" else self.qemu()


def quiet_env() -> dict[str, str]:
    """The environment for the VMMs (no Python warnings filters or coverage from ours)."""
    env = dict(os.environ)
    for key in ("PYTHONWARNINGS", "COVERAGE_PROCESS_START", "PYTHONTRACEMALLOC"):
        env.pop(key, None)
    # STRATO_BENCH_SRC=DIR runs strato from another copy of src/ (e.g. a snapshot taken before
    # a change), so the same suite measures both sides of it.
    alt = os.environ.get("STRATO_BENCH_SRC")
    if alt:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (alt, env.get("PYTHONPATH", "")) if p)
    return env


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    mag = abs(value)
    if mag >= 1000:
        return f"{value:,.0f}"
    decimals = max(0, digits - 1 - math.floor(math.log10(mag)))
    return f"{value:.{decimals}f}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
