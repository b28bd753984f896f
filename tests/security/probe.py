"""A `strato` process with one misbehaving piece, for the seccomp and landlock tests.

    python probe.py SCENARIO [strato flags...]

Every scenario runs the real command line (`strato.cli.main.main`), so the flags, the config,
landlock and the main thread's filter are wired as users get them; only one piece is replaced:

- `vcpu-socket` / `events-socket`: right after the vCPU 0 (or event loop) thread installed its
  filter, it creates an AF_INET socket (forbidden there, as a compromised device would), then
  writes "PROBE survived" to stderr.
- `open PATH...`: instead of booting, the main thread (after landlock and its filter) opens each
  PATH and prints "PROBE open PATH ok" or "PROBE open PATH <errno name>"; exit 0.
- `fork`: instead of booting, the main thread starts a thread (allowed), then forks (not).
- `api` / `api-socket` (with `--api-socket ...` among the flags): `strato --api-socket` as
  users run it; its HTTP thread says which filters it runs under ("PROBE api filters=...");
  with `api-socket` it then creates an AF_INET socket (forbidden there).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from strato.vmm import seccomp


def _say(text: str) -> None:
    os.write(2, f"PROBE {text}\n".encode())


def _misbehave_in(kind: str) -> None:
    original = seccomp.thread_hooks
    done = threading.Event()

    def thread_hooks(mode: str, kinds: Any = ("vcpu", "events")) -> dict[str, Callable[[], None]]:
        hooks = original(mode, kinds)
        inner = hooks.get(kind)

        def hook() -> None:
            if inner is not None:
                inner()
            if kind == "vcpu" and threading.current_thread().name != "vcpu0":
                return
            if done.is_set():
                return
            done.set()
            _say(f"{kind} filters={seccomp.installed_kinds()}")
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.close()
            _say("survived")

        hooks[kind] = hook
        return hooks

    seccomp.thread_hooks = thread_hooks  # type: ignore[assignment]


def _replace_run(fn: Callable[[], None]) -> None:
    import strato.vmm.runner as runner
    from strato.vmm.stop import Stop, StopReason

    def run(config: Any, **kwargs: Any) -> Stop:
        fn()
        return Stop(StopReason.POWEROFF, "probe done")

    runner.run = run  # type: ignore[assignment]


def _open_paths(paths: list[str]) -> None:
    for p in paths:
        try:
            with open(p, "rb"):
                pass
            _say(f"open {p} ok")
        except OSError as e:
            _say(f"open {p} {errno.errorcode.get(e.errno or 0, str(e.errno))}")


def _fork() -> None:
    t = threading.Thread(target=lambda: _say("thread ran"), name="helper")
    t.start()
    t.join()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    _say("forked")


def _misbehave_in_api(forbidden: bool) -> None:
    """The HTTP thread says which filters it runs under; with `forbidden` it then creates an
    AF_INET socket (as a compromised API thread would)."""
    original = seccomp.thread_hook

    def thread_hook(kind: str, mode: str) -> Callable[[], None] | None:
        inner = original(kind, mode)
        if kind != "api":
            return inner

        def hook() -> None:
            if inner is not None:
                inner()
            _say(f"api filters={seccomp.installed_kinds()}")
            if forbidden:
                socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
                _say("survived")

        return hook

    seccomp.thread_hook = thread_hook  # type: ignore[assignment]


def main() -> int:
    scenario, args = sys.argv[1], sys.argv[2:]
    if scenario in ("api", "api-socket"):
        _misbehave_in_api(forbidden=scenario == "api-socket")
    elif scenario in ("vcpu-socket", "events-socket"):
        _misbehave_in(scenario.split("-")[0])
    elif scenario == "open":
        split = args.index("--")
        paths, args = args[:split], args[split + 1 :]
        _replace_run(lambda: _open_paths(paths))
    elif scenario == "fork":
        _replace_run(_fork)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    from strato.cli.main import main as strato_main

    return strato_main(args, confine_process=True)


if __name__ == "__main__":
    sys.exit(main())
