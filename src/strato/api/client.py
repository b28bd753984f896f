"""A Python client for strato's (and Cloud Hypervisor's) REST API on a unix socket.

    from strato.api.client import ApiClient

    with ApiClient("/tmp/strato.sock") as api:
        api.create(config)          # a VmConfig, or Cloud Hypervisor's JSON as dict/str/bytes
        api.boot()
        print(api.info()["state"])  # "Running"

Every method raises ApiError (status and Cloud Hypervisor's message chain) when the server
answers with an error, and OSError when it cannot be reached. One connection is kept alive
between calls; a connection the server closed while idle is reopened once.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any

from strato.vmm.config import VmConfig
from strato.vmm.config_json import vm_config_to_json

API_ROOT = "/api/v1"


class ApiError(Exception):
    """The server answered with an error status."""

    def __init__(self, method: str, endpoint: str, status: int, reason: str, body: bytes) -> None:
        self.method = method
        self.endpoint = endpoint
        self.status = status
        self.reason = reason
        self.body = body
        self.messages = _messages(body)
        detail = ": ".join(self.messages) if self.messages else body.decode(errors="replace")
        super().__init__(f"{method} {endpoint}: {status} {reason}: {detail}")


def _messages(body: bytes) -> list[str]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    if isinstance(value, list) and all(isinstance(m, str) for m in value):
        return value
    return []


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    def __init__(self, socket_path: str | os.PathLike[str], timeout: float | None = 30.0) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout
        self._conn: _UnixConnection | None = None
        self._used = False  # the connection has carried a request before

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw requests ------------------------------------------------------------------------
    def request(
        self, method: str, endpoint: str, body: bytes | None = None
    ) -> tuple[int, str, bytes]:
        """Send one request to /api/v1/<endpoint>; returns (status, reason, body)."""
        path = f"{API_ROOT}/{endpoint}"
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = _UnixConnection(self.socket_path, self.timeout)
                self._used = False
            reused = self._used
            try:
                self._conn.request(method, path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if reused and attempt == 0:
                    continue  # the server closed the idle keep-alive connection: retry once
                raise
            except BaseException:
                self.close()
                raise
            self._used = True
            if resp.will_close:
                self.close()
            return resp.status, resp.reason, data
        raise AssertionError("unreachable")

    def _call(self, method: str, endpoint: str, body: bytes | None = None) -> Any:
        status, reason, data = self.request(method, endpoint, body)
        if status >= 300:
            raise ApiError(method, endpoint, status, reason, data)
        if status == 200 and data:
            return json.loads(data)
        return None

    # -- Cloud Hypervisor's endpoints --------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        """vmm.ping: {"build_version", "version", "pid", "features"}."""
        result: dict[str, Any] = self._call("GET", "vmm.ping")
        return result

    def shutdown_vmm(self) -> None:
        self._call("PUT", "vmm.shutdown")

    def create(self, config: VmConfig | dict[str, Any] | str | bytes) -> None:
        """vm.create with a VmConfig or Cloud Hypervisor's VmConfig JSON."""
        if isinstance(config, VmConfig):
            body = json.dumps(vm_config_to_json(config)).encode()
        elif isinstance(config, dict):
            body = json.dumps(config).encode()
        elif isinstance(config, str):
            body = config.encode()
        else:
            body = config
        self._call("PUT", "vm.create", body)

    def boot(self) -> None:
        self._call("PUT", "vm.boot")

    def info(self) -> dict[str, Any]:
        """vm.info: {"config", "state", "memory_actual_size", "device_tree"}."""
        result: dict[str, Any] = self._call("GET", "vm.info")
        return result

    def counters(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = self._call("GET", "vm.counters")
        return result

    def pause(self) -> None:
        self._call("PUT", "vm.pause")

    def resume(self) -> None:
        self._call("PUT", "vm.resume")

    def shutdown(self) -> None:
        self._call("PUT", "vm.shutdown")

    def reboot(self) -> None:
        self._call("PUT", "vm.reboot")

    def power_button(self) -> None:
        self._call("PUT", "vm.power-button")

    def delete(self) -> None:
        self._call("PUT", "vm.delete")
