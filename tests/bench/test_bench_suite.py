"""The benchmark suite's own logic (parsers, ratios, the README table), and one tiny real run.

Benchmarks are not tests: nothing here checks a timing. The real run only checks that both VMMs
ran the guest's exit loops and that the suite turned their output into results.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.common import Result, Results, Vm, alternate, fmt, median
from bench.memory import parse_smaps
from bench.report import BEGIN, END, table, verdict, write_readme
from bench.run import merge_latest
from bench.startup import probe_breakdown
from bench.vmrun import CLOCK_TICKS, VmRun, parse_proc_stat_cpu
from tests.guest.harness import GuestOutput
from tests.guest.qemu import kvm_usable, qemu_path

SMAPS = """\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                 100 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:               20480 kB
VmFlags: rd wr mr mw me ac
7f1000000000-7f1000001000 r-xp 00000000 fd:01 1234                       /usr/lib/libc.so.6
Size:                  4 kB
Rss:                   4 kB
VmFlags: rd ex mr mw me
"""


def test_smaps_overhead_skips_the_guest_ram_mapping() -> None:
    got = parse_smaps(SMAPS, guest_kib=128 * 1024)
    assert got.kib == 104
    assert got.skipped == [("[anon]", 131072, 20480)]
    # A bigger guest: the 128 MiB mapping is not guest RAM any more and counts.
    assert parse_smaps(SMAPS, guest_kib=1024 * 1024).kib == 104 + 20480


def test_proc_stat_cpu_with_spaces_and_parens_in_the_name() -> None:
    fields = " ".join(str(i) for i in range(4, 14))  # fields 4..13
    line = f"123 (python3 (x) y) S {fields} {3 * CLOCK_TICKS} {CLOCK_TICKS} 0 0 20 0"
    assert parse_proc_stat_cpu(line) == pytest.approx(4.0)


def test_ratio_and_advantage_follow_the_metric_direction() -> None:
    lower = Result("exits", "pio", "time", "ns", "lower", strato=[20, 30, 40], qemu=[15, 15, 60])
    assert lower.ratio == pytest.approx(2.0)
    assert lower.advantage == pytest.approx(0.5)
    higher = Result("block", "r", "IOPS", "IOPS", "higher", strato=[200], qemu=[100])
    assert higher.advantage == pytest.approx(2.0)
    assert Result("x", "y", "z", "u", "lower").ratio is None
    assert median([]) is None
    assert Result.from_dict(lower.to_dict()) == lower


def test_verdict_names_the_host_share_for_sequential_block() -> None:
    r = Result("block", "seq", "MB/s", "MB/s", "higher", [950], [900], [1000], goal="host too")
    assert verdict(r) == "yes; 95% of host"
    r = Result("exits", "pio", "t", "ns", "lower", [110], [100], goal="no worse")
    assert verdict(r) == "no"


def test_alternate_flips_the_order_every_round() -> None:
    seen: list[tuple[str, int]] = []
    alternate(3, lambda vmm, i: seen.append((vmm, i)))
    assert seen == [
        ("strato", 0),
        ("qemu", 0),
        ("qemu", 1),
        ("strato", 1),
        ("strato", 2),
        ("qemu", 2),
    ]


def test_fmt_keeps_three_significant_digits() -> None:
    assert fmt(None) == "-"
    assert fmt(0.012345) == "0.0123"
    assert fmt(12.345) == "12.3"
    assert fmt(123456.7) == "123,457"


def test_readme_table_is_regenerated_between_the_markers(tmp_path: Path) -> None:
    results = Results("test")
    results.add(Result("exits", "pio", "time per exit", "ns", "lower", [30], [20], goal="g"))
    results.details["startup_breakdown_ms"] = {"interpreter": 20.0, "imports": 50.0}
    data = json.loads(json.dumps(results.to_dict(), default=str))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{BEGIN}\nold table\n{END}\n\nafter\n")
    write_readme(table(data, before=data), readme)
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n") and text.endswith(f"{END}\n\nafter\n")
    assert "old table" not in text
    assert "| pio | time per exit (ns) | 30.0 | 20.0 | - | 1.50 | 0.667 | 0.667 | g | no |" in text
    assert "| interpreter | imports |" in text


def test_merge_keeps_benchmarks_the_run_did_not_measure(tmp_path: Path) -> None:
    latest = tmp_path / "latest.json"
    old = {
        "started": "t0",
        "results": [{"bench": "linux"}, {"bench": "exits", "v": 1}],
        "details": {"a": 1},
    }
    latest.write_text(json.dumps(old))
    run = {"started": "t1", "results": [{"bench": "exits", "v": 2}], "details": {"b": 2}}
    merged = merge_latest(run, latest)
    assert merged["results"] == [{"bench": "linux"}, {"bench": "exits", "v": 2}]
    assert merged["measured"] == {"linux": "t0", "exits": "t1"}
    assert merged["details"] == {"a": 1, "b": 2}


def test_startup_breakdown_from_probe_marks() -> None:
    launched = 100.0
    stderr = "\n".join(
        f"STRATO-PROBE {step} {int((launched + t) * 1e9)}"
        for step, t in (
            ("interpreter", 0.020),
            ("imports", 0.070),
            ("config", 0.072),
            ("vm", 0.080),
            ("first KVM_RUN", 0.085),
        )
    )
    run = VmRun([], 1, launched, GuestOutput(), 0.090, None, 0.120, 0, 0.1, 0.0, 0, [], stderr)
    got = probe_breakdown(run)
    assert got["interpreter"] == pytest.approx(20.0, abs=0.01)
    assert got["imports"] == pytest.approx(50.0, abs=0.01)
    assert got["first KVM_RUN"] == pytest.approx(5.0, abs=0.01)
    assert got["guest to first line"] == pytest.approx(5.0, abs=0.01)
    assert got["first line to exit"] == pytest.approx(30.0, abs=0.01)


def test_vm_renders_the_same_machine_for_both_vmms(tmp_path: Path) -> None:
    vm = Vm(tmp_path / "g.elf", cmdline="bench=idle", memory_mib=128, disk=tmp_path / "d.raw")
    strato, qemu = vm.command("strato"), vm.command("qemu")
    assert strato[strato.index("--cmdline") + 1] == "bench=idle"
    assert f"path={tmp_path / 'd.raw'},serial=strato-disk0" in strato
    assert qemu[qemu.index("-append") + 1] == "bench=idle"
    assert qemu[qemu.index("-m") + 1] == "128"
    vm.qemu_machine = "microvm"
    assert vm.qemu()[vm.qemu().index("-M") + 1] == "microvm"


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.skipif(not kvm_usable(), reason="needs /dev/kvm")
@pytest.mark.skipif(qemu_path() is None, reason="needs qemu-system-x86_64")
def test_a_tiny_exits_run_on_both_vmms() -> None:
    from bench import exits

    results = Results("test")
    exits.run(results, runs=1, count=500)
    assert [(r.case, r.metric) for r in results.items] == [
        (label, metric)
        for _, _, label, _ in exits.CASES
        for metric in ("time per exit", "VMM CPU per exit")
    ]
    for r in results.items:
        assert len(r.strato) == 1 and len(r.qemu) == 1, r
        # CPU time comes in clock ticks: a short loop may show none.
        floor = 0 if r.metric.startswith("VMM CPU") else 1e-9
        assert r.strato[0] >= floor and r.qemu[0] >= floor, r
