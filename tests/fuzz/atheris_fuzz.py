"""Coverage-guided fuzzing with atheris (libFuzzer), on demand; the byte-level targets.

    pip install atheris==3.0.0   # 3.1.0 has no build for this platform; 3.0.0 runs on 3.11
    python -m tests.fuzz.atheris_fuzz api-http -max_total_time=600
    python -m tests.fuzz.atheris_fuzz --list

Each target is a function of bytes that raises only when a property is broken (the same
properties as the hypothesis targets). Seeds come from tests/fuzz/corpus/<target>/; what
libFuzzer learns goes to /tmp/strato-atheris/<target>/; an input that breaks a property is
written as tests/fuzz/corpus/<target>/crash-<sha1>, where test_fuzz_corpus.py replays it in
every run of the suite from then on (give it a telling name, or a known-bug entry).

With a seed corpus atheris finds what random generation misses: the Content-Length bug
(corpus/api-http/content-length-superscript.bin) took it under a second.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from strato.api import http
from strato.api.handlers import BodyError, loads_strict
from strato.boot import BootError
from strato.boot._common import cmdline_bytes
from strato.boot.layout import LAYOUT
from strato.memory import GuestMemory
from strato.vmm.config_json import ConfigJsonError, vm_config_from_json, vm_config_to_json

CORPUS = Path(__file__).parent / "corpus"
_MEM: GuestMemory | None = None


def _memory() -> GuestMemory:
    global _MEM
    if _MEM is None:
        from tests.fuzz.test_fuzz_boot import RAM

        _MEM = GuestMemory.anonymous([(0, RAM)])
    return _MEM


def api_http(data: bytes) -> None:
    """A request head parses or is an HttpError with a 4xx/5xx status."""
    found = http.find_head_end(data)
    try:
        head = http.parse_head(data if found is None else data[: found[0]], max_body_bytes=1000)
    except http.HttpError as e:
        assert 400 <= e.status < 600
        return
    assert 0 <= head.content_length <= 1000 and head.path.startswith("/")


def config_json(data: bytes) -> None:
    """A vm.create body is a VmConfig or a 400 (BodyError / ConfigJsonError); accepted ones
    round-trip through JSON."""
    try:
        cfg = vm_config_from_json(loads_strict(data))
    except (BodyError, ConfigJsonError):
        return
    assert vm_config_from_json(json.loads(json.dumps(vm_config_to_json(cfg)))) == cfg


def cli(data: bytes) -> None:
    """NUL-separated argv: a VmConfig, a ConfigError or argparse's exit 2."""
    from tests.fuzz.test_fuzz_cli import parse

    parse(data.decode("utf-8", "replace").split("\0"))


def _kernel(data: bytes) -> None:
    from tests.fuzz.test_fuzz_boot import load_checked

    load_checked(_memory(), data, "console=ttyS0", b"initrd")


def cmdline(data: bytes) -> None:
    try:
        out = cmdline_bytes(data, LAYOUT)
    except BootError:
        return
    assert out == data.removesuffix(b"\0") and 0 not in out


# The properties, as the corpus replay checks them.
PROPERTIES: dict[str, Callable[[bytes], None]] = {
    "api-http": api_http,
    "config-json": config_json,
    "cli": cli,
    "bzimage": _kernel,
    "elf": _kernel,
    "cmdline": cmdline,
}
# What atheris runs: the same, minus inputs that hit a bug already reported.
TARGETS = PROPERTIES


def run(target: str, args: list[str]) -> None:
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

    import tests.fuzz.test_fuzz_api
    import tests.fuzz.test_fuzz_boot
    import tests.fuzz.test_fuzz_cli  # noqa: F401  (loaded before instrumenting)

    fn = TARGETS[target]
    scratch = Path("/tmp/strato-atheris") / target
    scratch.mkdir(parents=True, exist_ok=True)
    seeds = CORPUS / target
    seeds.mkdir(parents=True, exist_ok=True)
    argv = [sys.argv[0], f"-artifact_prefix={seeds}/", *args, str(scratch), str(seeds)]
    atheris.instrument_all()
    atheris.Setup(argv, fn)
    atheris.Fuzz()


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        print(f"usage: python -m tests.fuzz.atheris_fuzz {{{','.join(TARGETS)}}} [libFuzzer args]")
        return 0 if "--list" in sys.argv else 2
    run(sys.argv[1], sys.argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
