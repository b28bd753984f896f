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
- `api SOCKET`: the REST API under the `api` filter on its HTTP thread, the main filter on the
  rest (as `strato --api-socket` will run once the server has a thread-start hook).
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


def _api(sock_path: str) -> int:
    from strato.api.handlers import ApiHandler
    from strato.api.server import ApiServer
    from strato.vmm.controller import VmmController

    mode = os.environ.get("PROBE_SECCOMP", "true")
    seccomp.install("main", mode)
    controller = VmmController()
    controller.start()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(16)
    server = ApiServer(listener, ApiHandler(controller))
    hook = seccomp.thread_hook("api", mode)

    def serve() -> None:
        if hook is not None:
            hook()
        _say(f"api filters={seccomp.installed_kinds()}")
        server._serve()  # the server's thread body (ApiServer has no thread-start hook yet)

    thread = threading.Thread(target=serve, name="http-server", daemon=True)
    server._thread = thread
    thread.start()
    try:
        while not controller.wait(0.2):
            pass
    finally:
        server.close()
        controller.close()
    os.unlink(sock_path)
    return controller.exit_status


def main() -> int:
    scenario, args = sys.argv[1], sys.argv[2:]
    if scenario == "api":
        return _api(args[0])
    if scenario in ("vcpu-socket", "events-socket"):
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
