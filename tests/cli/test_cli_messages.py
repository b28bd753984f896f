"""What a new user hit (issue 10): flags that were silently accepted, and an error message
whose suggestion was then refused. Each case: the exact message, and exit status 2."""

from __future__ import annotations

import re

import pytest

from strato.cli.args import build_parser, config_from_args
from strato.cli.main import main
from strato.vmm import options
from strato.vmm.config import ConfigError
from strato.vmm.stop import EXIT_CONFIG_ERROR


def error_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    status = main(["--kernel", "vmlinuz", *argv])
    assert status == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.removeprefix("strato: error: ").removesuffix("\n")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "--rng '': empty value (expected src=PATH, e.g. src=/dev/urandom)"),
        ("  ", "--rng '  ': empty value (expected src=PATH, e.g. src=/dev/urandom)"),
        ("src=", "--rng src=: a path is required (e.g. src=/dev/urandom)"),
    ],
)
def test_empty_rng_is_an_error_not_no_device(
    capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    assert error_of(capsys, "--rng", value) == message


def test_rng_defaults_to_urandom() -> None:
    cfg = config_from_args(build_parser().parse_args(["--rng", "src=/dev/random"]))
    assert cfg.rng is not None and str(cfg.rng.src) == "/dev/random"
    assert str(options.parse_rng("iommu=off").src) == "/dev/urandom"


def test_memory_size_suggestions_are_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    message = error_of(capsys, "--memory", "size=1X")
    m = re.fullmatch(r"--memory size=1X: not a size \(examples: (.*)\)", message)
    assert m, message
    examples = m.group(1).split(", ")
    assert len(examples) >= 3
    for example in examples:
        cfg = config_from_args(build_parser().parse_args(["--memory", f"size={example}"]))
        assert cfg.memory.size >= 16 << 20, example


def test_the_old_suggestion_is_still_refused_with_its_reason() -> None:
    with pytest.raises(ConfigError, match="at least 16M is needed"):
        options.parse_memory("size=4096")


def test_no_shutdown_needs_the_api(capsys: pytest.CaptureFixture[str]) -> None:
    assert error_of(capsys, "--no-shutdown") == (
        "--no-shutdown: only with --api-socket (it keeps the VMM serving the API after the "
        "guest stops; without the API, strato exits when the guest stops)"
    )


def test_firmware_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert error_of(capsys, "--firmware", "fw.bin") == (
        "--firmware: firmware boot is not supported yet; use --kernel"
    )


def test_help_says_what_each_of_these_does() -> None:
    text = build_parser().format_help()
    for flag, words in (
        ("--firmware", "not supported yet"),
        ("--no-shutdown", "with --api-socket"),
        ("--log-file", "instead of stderr"),
    ):
        assert re.search(re.escape(flag) + r"[^\n]*\n?\s*[^\n]*" + re.escape(words), text), flag
