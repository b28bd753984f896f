"""Every snippet in the README is a tested one.

- ```python blocks run, as written, in a directory where `vmlinuz` is a small real guest
  (tests/guests/pvh_hello: prints a few lines on COM1, then resets the machine).
- Shell blocks: every `strato` and `strato-remote` line parses (strato's own parser and config
  conversion, as the command does before touching any file); the usage example and the REST API
  example also run for real, on the same small guest. Other lines name things that exist
  (`bash scripts/...`, `python -m ...`, `pip install -e .[extra]`).
- The flags table lists every flag of `strato --help`, and nothing else.
- The platform notes the README points to are the project's own (docs/PLATFORM.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from strato.cli import remote
from strato.cli.args import build_parser, config_from_args
from tests.guests.asm import build_elf

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUN_TIMEOUT = 120.0  # seconds; each run here takes about one
needs_kvm = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int  # 1-based line of the opening fence

    def commands(self) -> list[str]:
        """Shell command lines, backslash continuations joined."""
        out: list[str] = []
        pending = ""
        for raw in self.text.splitlines():
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            if line and not line.startswith("#"):
                out.append(line)
        return out


def blocks(text: str) -> list[Block]:
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m:
            end = lines.index("```", i + 1)
            out.append(Block(m.group(1), "\n".join(lines[i + 1 : end]) + "\n", i + 1))
            i = end
        i += 1
    return out


BLOCKS = blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b.lang == "python"]
SHELL = [b for b in BLOCKS if b.lang in ("", "sh", "bash", "console", "shell")]
COMMANDS = [(b, c) for b in SHELL for c in b.commands()]


def argv_of(command: str) -> list[str]:
    return shlex.split(command.removesuffix("&").strip())


def test_the_readme_has_the_snippets_this_test_checks() -> None:
    assert len(PYTHON) >= 1
    progs = {argv_of(c)[0] for _, c in COMMANDS}
    assert {"strato", "strato-remote", "bash"} <= progs, progs


@pytest.fixture(scope="module")
def guest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with `vmlinuz` (a small PVH guest) and `initrd.img`, as the README has."""
    d = tmp_path_factory.mktemp("readme")
    elf = build_elf("pvh_hello", tmp_path_factory.mktemp("build"), [])
    shutil.copy(elf, d / "vmlinuz")
    (d / "initrd.img").write_bytes(b"070701" + bytes(506))  # a module the guest ignores
    return d


def fresh(guest_dir: Path, tmp_path: Path) -> Path:
    for f in guest_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


@needs_kvm
@pytest.mark.kvm
@pytest.mark.parametrize("block", PYTHON, ids=lambda b: f"line{b.line}")
def test_python_blocks_run_as_written(block: Block, guest_dir: Path, tmp_path: Path) -> None:
    cwd = fresh(guest_dir, tmp_path)
    p = subprocess.run(
        [sys.executable, "-c", block.text],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert p.returncode == 0, f"README line {block.line}:\n{p.stderr}"
    assert "Traceback" not in p.stderr
    if "serial.log" in block.text:
        assert "PVH32 hello" in (cwd / "serial.log").read_text()
    if "stop.reason" in block.text:  # the embedding example: a guest reset under no_reboot
        assert p.stdout.split() == ["StopReason.RESET", "0", "0"], p.stdout


@pytest.mark.parametrize(
    ("block", "command"),
    [(b, c) for b, c in COMMANDS if argv_of(c)[0] in ("strato", "strato-remote")],
    ids=lambda x: f"line{x.line}" if isinstance(x, Block) else "",
)
def test_command_lines_parse(block: Block, command: str) -> None:
    argv = argv_of(command)
    try:
        if argv[0] == "strato":
            ns = build_parser().parse_args(argv[1:])
            config_from_args(ns)
        else:
            remote.build_parser().parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"README line {block.line}: {command!r} does not parse (exit {e.code})")


@pytest.mark.parametrize(
    ("block", "command"),
    [(b, c) for b, c in COMMANDS if argv_of(c)[0] not in ("strato", "strato-remote")],
    ids=lambda x: f"line{x.line}" if isinstance(x, Block) else "",
)
def test_other_command_lines_name_what_exists(block: Block, command: str) -> None:
    argv = argv_of(command)
    if argv[0] == "bash":
        assert (ROOT / argv[1]).is_file(), command
    words = [w for w in argv if w != "&&"]
    for i, w in enumerate(words):
        if w == "-m" and i + 1 < len(words):
            assert importlib.util.find_spec(words[i + 1]) is not None, command
        m = re.fullmatch(r"\.\[(\w+)\]", w)
        if m:
            extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
                "optional-dependencies"
            ]
            assert m.group(1) in extras, command


def _section(name: str) -> list[Block]:
    text = README.read_text()
    start = text.index(f"## {name}")
    end = text.find("\n## ", start + 1)
    return blocks(text[start : end if end > 0 else len(text)])


@needs_kvm
@pytest.mark.kvm
def test_the_usage_example_runs(guest_dir: Path, tmp_path: Path) -> None:
    (block,) = [b for b in _section("Using it") if b.lang == ""]
    (command,) = block.commands()
    argv = argv_of(command)
    assert argv[0] == "strato"
    p = subprocess.run(
        [sys.executable, "-m", "strato.cli.main", *argv[1:]],
        cwd=fresh(guest_dir, tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert p.returncode == 0, p.stderr
    assert "PVH32 hello" in p.stdout  # --serial tty


@needs_kvm
@pytest.mark.kvm
def test_the_rest_api_example_runs(guest_dir: Path, tmp_path: Path) -> None:
    """The block's lines in order, its socket moved into this test's directory."""
    (block,) = _section("REST API")
    cwd = fresh(guest_dir, tmp_path)
    sock = str(cwd / "api.sock")
    commands = [argv_of(c.replace("/tmp/strato.sock", sock)) for c in block.commands()]
    assert commands[0][0] == "strato" and block.commands()[0].endswith("&")
    vmm = subprocess.Popen(
        [sys.executable, "-m", "strato.cli.main", *commands[0][1:]],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not Path(sock).exists() and vmm.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # polling interval
        outputs = []
        for argv in commands[1:]:
            assert argv[0] == "strato-remote"
            p = subprocess.run(
                [sys.executable, "-m", "strato.cli.remote", *argv[1:]],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT,
            )
            assert p.returncode == 0, (argv, p.stderr)
            outputs.append(p.stdout)
        status = vmm.wait(timeout=RUN_TIMEOUT)
    finally:
        if vmm.poll() is None:
            vmm.kill()
        _, err = vmm.communicate()
    assert status == 0, err
    info = json.loads(outputs[0])
    assert info["state"] == "Running" and isinstance(info["reboots"], int)
    assert "PVH32 hello" in (cwd / "serial.log").read_text()


def _table_flags() -> set[str]:
    """The flags in the first column of the README's flags table."""
    text = README.read_text()
    cells = re.findall(r"^\| (`-.*?) \|", text, re.M)
    return {flag for cell in cells for flag in re.findall(r"`(--?[\w-]+)", cell)}


def test_the_flags_table_is_strato_help() -> None:
    parser = build_parser()
    flags = {
        max(a.option_strings, key=len)
        for a in parser._actions
        if a.option_strings and a.dest not in ("help", "version")
    }
    assert flags == _table_flags()


def test_platform_notes_are_the_projects_own() -> None:
    text = README.read_text()
    assert "(docs/PLATFORM.md)" in text
    assert (ROOT / "docs" / "PLATFORM.md").is_file()
    checked = [README, ROOT / "docs" / "PLATFORM.md"]
    for tree in ("src", "scripts"):
        checked += [p for p in (ROOT / tree).rglob("*") if p.is_file() and p.suffix != ".pyc"]
    offenders = [
        str(p.relative_to(ROOT))
        for p in checked
        if "egg-info" not in str(p) and "../shared" in p.read_text(errors="replace")
    ]
    assert offenders == []
