"""The `strato` command line: Cloud Hypervisor's flags, exact errors, exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from strato.cli.args import build_parser, config_from_args
from strato.cli.main import main
from strato.vmm import options
from strato.vmm.config import ConfigError, ConsoleMode


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return config_from_args(build_parser().parse_args(list(argv)))


def test_defaults_follow_cloud_hypervisor(tmp_path: Path) -> None:
    cfg = parse("--kernel", "k")
    assert cfg.cpus.boot_vcpus == 1
    assert cfg.memory.size == 512 << 20
    assert cfg.serial.mode is ConsoleMode.NULL
    assert cfg.console.mode is ConsoleMode.TTY
    assert cfg.no_reboot is False


def test_full_command_line(tmp_path: Path) -> None:
    cfg = parse(
        "--kernel", "k", "--cmdline", "console=ttyS0 quiet", "--cpus", "boot=4",
        "--memory", "size=1G,shared=on", "--serial", f"file={tmp_path}/s.log",
        "--console", "off", "--no-reboot", "--disk", "path=/a,readonly=on,serial=abc",
        "--disk", "path=/b,num_queues=4,queue_size=256", "--rng", "src=/dev/random",
        "--net", "tap=tap0,mac=12:34:56:78:9a:bc",
    )  # fmt: skip
    assert cfg.cpus.boot_vcpus == 4
    assert cfg.memory.size == 1 << 30 and cfg.memory.shared
    assert cfg.serial.mode is ConsoleMode.FILE and cfg.serial.file == tmp_path / "s.log"
    assert cfg.console.mode is ConsoleMode.OFF
    assert cfg.payload.cmdline == "console=ttyS0 quiet"
    assert [d.readonly for d in cfg.disks] == [True, False]
    assert cfg.disks[0].serial == "abc"
    assert cfg.disks[1].num_queues == 4 and cfg.disks[1].queue_size == 256
    assert cfg.rng is not None and str(cfg.rng.src) == "/dev/random"
    assert cfg.net[0].tap == "tap0" and cfg.net[0].mac == "12:34:56:78:9a:bc"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cpus", "boot=0"], "--cpus boot=0: must be between 1 and 254"),
        (["--cpus", "boot=x"], "--cpus boot=x: not an integer"),
        (["--cpus", "boot=2,max=1"], "--cpus max=1: must be at least boot=2"),
        (["--cpus", "bogus=1"], "--cpus 'bogus=1': unknown parameter 'bogus'"),
        (["--memory", "size=12Q"], "--memory size=12Q: not a size"),
        (["--memory", "size=8M"], "--memory size=8M: at least 16M is needed"),
        (["--memory", "size=512M,shared=maybe"], "--memory shared=maybe: expected on or off"),
        (["--memory", "512M"], "--memory '512M': '512M' is not key=value"),
        (["--serial", "bogus"], "--serial bogus: expected off, null, tty, pty or file=PATH"),
        (["--serial", "file="], "--serial file=: a path is required"),
        (["--serial", "tty"], "--serial tty and --console tty: only one of them"),
        (["--disk", "readonly=on"], "--disk 'readonly=on': path= is required"),
        (["--disk", "path=/a,queue_size=3"], "--disk queue_size=3: must be a power of two"),
        (["--disk", "path=/a,readonly=yes"], "--disk readonly=yes: expected on or off"),
        (["--disk", "path=/a,path=/b"], "'path' given twice"),
        (["--disk", "path=/a,serial=" + "x" * 21], "at most 20 bytes"),
        (["--net", "tap=t,mac=zz"], "--net mac=zz: not a MAC address"),
        (["--net", "tap=t,num_queues=3"], "--net num_queues=3: must be even"),
        (["--net", "tap=" + "t" * 16], "interface names are 1 to 15 characters"),
        (["--rng", "source=/dev/urandom"], "--rng 'source=/dev/urandom': unknown parameter"),
        (["--firmware", "fw.bin"], "--firmware: firmware boot is not supported yet"),
    ],
)
def test_bad_values_name_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse("--kernel", "k", *argv)
    assert message in str(e.value)


def test_cli_bad_value_exit_status_and_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--kernel", "k", "--cpus", "boot=0"]) == 2
    err = capsys.readouterr().err
    assert err == "strato: error: --cpus boot=0: must be between 1 and 254\n"


def test_cli_missing_kernel_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--kernel", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"strato: error: --kernel {tmp_path}/nope: no such file\n"


def test_cli_no_payload(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "--kernel is required" in capsys.readouterr().err


def test_unknown_flag_exits_2_without_traceback() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "strato.cli.main", "--kernel", "k", "--bogus"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2
    assert "strato: error: unrecognized arguments: --bogus" in p.stderr
    assert "Traceback" not in p.stderr


def test_size_suffixes() -> None:
    assert options.parse_size("memory", "size", "4096") == 4096
    assert options.parse_size("memory", "size", "2K") == 2048
    assert options.parse_size("memory", "size", "3G") == 3 << 30
