"""The endpoints strato serves under /api/v1, with Cloud Hypervisor's names and methods.

Every endpoint of Cloud Hypervisor's API is listed; those strato does not implement yet
answer 501 Not Implemented with a message naming them (never a crash, never a 404 that would
suggest a typo). openapi.yaml documents exactly this table; tests/api/test_openapi.py checks it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from strato.vmm.controller import Action

API_ROOT = "/api/v1"


class Body(enum.Enum):
    NONE = "none"  # a request body is refused (Cloud Hypervisor: 400)
    REQUIRED = "required"
    OPTIONAL = "optional"  # read and ignored (the endpoints strato does not implement)


@dataclass(frozen=True)
class Endpoint:
    name: str  # "vm.create"
    method: str  # "GET" or "PUT"
    action: Action | None  # None: not implemented by strato (501)
    body: Body
    ok_status: int  # 200 with a JSON body, or 204 without one

    @property
    def path(self) -> str:
        return f"{API_ROOT}/{self.name}"


def _put(name: str, action: Action, body: Body = Body.NONE) -> Endpoint:
    return Endpoint(name, "PUT", action, body, 204)


def _get(name: str, action: Action) -> Endpoint:
    return Endpoint(name, "GET", action, Body.NONE, 200)


def _later(name: str, body: Body = Body.OPTIONAL) -> Endpoint:
    return Endpoint(name, "PUT", None, body, 204)


ENDPOINTS: tuple[Endpoint, ...] = (
    _get("vmm.ping", Action.PING),
    _put("vmm.shutdown", Action.SHUTDOWN_VMM),
    _put("vm.create", Action.CREATE, Body.REQUIRED),
    _put("vm.boot", Action.BOOT),
    _get("vm.info", Action.INFO),
    _get("vm.counters", Action.COUNTERS),
    _put("vm.pause", Action.PAUSE),
    _put("vm.resume", Action.RESUME),
    _put("vm.shutdown", Action.SHUTDOWN),
    _put("vm.reboot", Action.REBOOT),
    _put("vm.power-button", Action.POWER_BUTTON),
    _put("vm.delete", Action.DELETE),
    # Cloud Hypervisor's other endpoints: known, not implemented yet.
    _later("vm.resize"),
    _later("vm.resize-disk"),
    _later("vm.resize-zone"),
    _later("vm.add-device"),
    _later("vm.remove-device"),
    _later("vm.add-disk"),
    _later("vm.add-fs"),
    _later("vm.add-generic-vhost-user"),
    _later("vm.add-pmem"),
    _later("vm.add-net"),
    _later("vm.add-vsock"),
    _later("vm.add-vdpa"),
    _later("vm.add-user-device"),
    _later("vm.snapshot"),
    _later("vm.coredump"),
    _later("vm.restore"),
    _later("vm.receive-migration"),
    _later("vm.send-migration"),
    _later("vm.nmi", Body.NONE),
)

ROUTES: dict[str, Endpoint] = {e.path: e for e in ENDPOINTS}
