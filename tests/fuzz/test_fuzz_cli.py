"""Fuzz target "cli": the `strato` command line (argparse + Cloud Hypervisor option strings).

argv comes from a grammar of strato's flags with option strings built from their real keys and
hostile values (huge and non-ASCII digits, empty parts, repeated keys, stray '=' and ',',
newlines). For any argv:
- parsing ends in a VmConfig, a ConfigError (exit status 2 in `strato`) or argparse's own
  exit with status 2 — never another exception (which `strato` would turn into a traceback
  and exit status 1);
- a config the command line accepts is one the REST API accepts too: it survives a round trip
  through Cloud Hypervisor's config JSON unchanged (vm.info shows it, vm.create takes it back;
  fields the JSON does not carry, such as --no-reboot, aside).
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from strato.cli.args import build_parser, config_from_args
from strato.vmm import options
from strato.vmm.config import ConfigError, VmConfig
from strato.vmm.config_json import ConfigJsonError, vm_config_from_json, vm_config_to_json
from tests.fuzz._support import count, fuzz_settings

# Bugs this suite found, fixed, and kept as the regression tests below: a size of more than
# 4300 digits raised ValueError instead of ConfigError; --net ip=/mask= were not checked as the
# API checks them; a NUL in --cmdline or a path was accepted.

# -- the argv grammar --------------------------------------------------------------------------
numbers = st.one_of(
    st.integers(-2, 300).map(str),
    st.sampled_from(["0x10", "0o7", "1_0", " 1", "1 ", "+1", "٣", "²", "", "1e3", "9" * 30]),
    st.sampled_from(["9" * 4301]),
)
sizes = st.one_of(
    st.tuples(st.integers(0, 4096), st.sampled_from(["", "K", "M", "G", "T", "k", "MB", "m"])).map(
        lambda t: f"{t[0]}{t[1]}"
    ),
    st.sampled_from(["512M", "16M", "15M", "4097", "1G\n", "-1M", "٣M", "M", "99999999999999T"]),
)
bools = st.sampled_from(["on", "off", "true", "false", "yes", "", "ON"])
words = st.text(st.characters(max_codepoint=0x2FF), max_size=12)
macs = st.sampled_from(["12:34:56:78:9a:bc", "12:34:56:78:9a:bc\n", "12:34:56:78:9a", "zz"])

KEYS: dict[str, dict[str, st.SearchStrategy[str]]] = {
    "cpus": {"boot": numbers, "max": numbers, "topology": words, "kvm_hyperv": bools},
    "memory": {"size": sizes, "shared": bools, "hugepages": bools, "prefault": bools},
    "disk": {
        "path": words,
        "readonly": bools,
        "direct": bools,
        "num_queues": numbers,
        "queue_size": numbers,
        "id": words,
        "serial": words,
        "bw_size": numbers,
        "ops_refill_time": numbers,
    },
    "net": {
        "tap": words,
        "mac": macs,
        "host_mac": macs,
        "ip": st.sampled_from(["192.168.1.1", "::1", "foo"]),
        "mask": st.sampled_from(["255.255.255.0", "1.2.3"]),
        "mtu": numbers,
        "num_queues": numbers,
        "queue_size": numbers,
        "id": words,
    },
    "rng": {"src": words, "iommu": bools},
}


@st.composite
def option_string(draw: st.DrawFn, flag: str) -> str:
    keys = KEYS[flag]
    parts = []
    for key in draw(st.lists(st.sampled_from([*keys, "bogus", ""]), max_size=5)):
        if key in keys and draw(st.integers(0, 9)):
            parts.append(f"{key}={draw(keys[key])}")
        else:
            parts.append(draw(st.sampled_from([key, f"{key}=", "=", "=x", "a=b=c"])))
    return ",".join(parts)


consoles = st.sampled_from(["off", "null", "tty", "pty", "file=/tmp/x", "file=", "socket=/s", ""])


@st.composite
def argvs(draw: st.DrawFn) -> list[str]:
    argv: list[str] = []
    if draw(st.integers(0, 9)):
        argv += ["--kernel", draw(st.sampled_from(["/k", "", "-"]) | words)]
    for flag in draw(
        st.lists(st.sampled_from([*KEYS, "serial", "console", "cmdline"]), max_size=6)
    ):
        if flag in ("serial", "console"):
            argv += [f"--{flag}", draw(consoles)]
        elif flag == "cmdline":
            argv += ["--cmdline", draw(st.sampled_from(["console=ttyS0", "", "a\x00b"]) | words)]
        else:
            argv += [f"--{flag}", draw(option_string(flag))]
    if draw(st.integers(0, 19)) == 0:
        argv.append(
            draw(st.sampled_from(["--bogus", "--no-reboot", "-v", "--memory", "--cpus=boot=2"]))
        )
    return argv


def parse(argv: list[str]) -> VmConfig | None:
    """The config, or None when the command line was refused the documented ways."""
    parser = build_parser()
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            ns = parser.parse_args(argv)
    except SystemExit as e:
        assert e.code in (0, 2), e.code  # 0: --version / --help
        return None
    try:
        return config_from_args(ns)
    except ConfigError as e:
        assert str(e).startswith("--") or "--" in str(e), str(e)  # names the flag
        return None


@fuzz_settings(500)
@given(argv=argvs())
@example(argv=["--kernel", "/k", "--net", "tap=t0,mac=12:34:56:78:9a:bc,mtu=68,queue_size=2"])
@example(argv=["--kernel", "/k", "--disk", "path=/d,serial=" + "é" * 11])
def test_command_line(argv: list[str]) -> None:
    count("cli")
    cfg = parse(argv)
    if cfg is None:
        return
    try:
        again = vm_config_from_json(json.loads(json.dumps(vm_config_to_json(cfg))))
    except ConfigJsonError as e:
        raise AssertionError(f"the CLI accepted a config the API refuses: {e}") from None
    assert vm_config_to_json(again) == vm_config_to_json(cfg)  # what the API can carry


def test_huge_memory_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        options.parse_memory("size=" + "1" * 4301)


def test_net_ip_is_checked_like_the_api_does() -> None:
    with pytest.raises(ConfigError):
        options.parse_net("tap=t0,ip=foo")


def test_cmdline_with_a_nul_is_refused_like_the_api_does() -> None:
    with pytest.raises(ConfigError):
        config_from_args(build_parser().parse_args(["--kernel", "/k", "--cmdline", "a\x00b"]))
