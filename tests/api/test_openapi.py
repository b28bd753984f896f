"""openapi.yaml describes exactly what the server serves: the same paths and methods, and for
each operation exactly the status codes the running server answers with (driven through
every state), with bodies that match the documented schemas."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest

from strato.api.routes import ENDPOINTS, ROUTES, Body
from tests.api.helpers import KVM, ApiEnv, openapi_doc, run_matrix
from tests.api.test_server import MALFORMED, NEGATIVE

yaml_doc = openapi_doc()
pytestmark = pytest.mark.skipif(yaml_doc is None, reason="PyYAML is not installed")


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    assert yaml_doc is not None
    return yaml_doc


def to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 schema -> JSON Schema: `nullable: true` becomes a null type."""
    if isinstance(node, dict):
        out = {k: to_json_schema(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") and "type" in node:
            out["type"] = [node["type"], "null"]
        return out
    if isinstance(node, list):
        return [to_json_schema(v) for v in node]
    return node


def validator(doc: dict[str, Any]) -> Callable[[Any, str], None]:
    jsonschema = pytest.importorskip("jsonschema")
    components = to_json_schema(doc["components"])

    def validate(instance: Any, ref: str) -> None:
        jsonschema.validate(instance, {"$ref": ref, "components": components})

    return validate


def test_same_paths_and_methods(doc: dict[str, Any]) -> None:
    served = {(e.path.removeprefix("/api/v1"), e.method.lower()) for e in ENDPOINTS}
    documented = {(path, m) for path, ops in doc["paths"].items() for m in ops}
    assert documented == served
    assert doc["servers"][0]["url"].endswith("/api/v1")


def test_not_implemented_endpoints_say_so(doc: dict[str, Any]) -> None:
    for e in ENDPOINTS:
        responses = doc["paths"][e.path.removeprefix("/api/v1")][e.method.lower()]["responses"]
        if e.action is None:
            expected = {501, 400} if e.body is Body.NONE else {501}
            assert set(responses) == expected, e.name
        else:
            assert 501 not in responses, e.name


def test_protocol_errors_are_the_ones_the_server_produces(doc: dict[str, Any]) -> None:
    produced = {status for _name, _req, status, _words in NEGATIVE if status != 500}
    produced |= {status for _name, _data, status, _words in MALFORMED}
    produced -= {204}
    assert set(doc["x-protocol-errors"]) == produced - {500}


@pytest.mark.kvm
@pytest.mark.skipif(not KVM, reason="needs /dev/kvm")
def test_documented_statuses_are_exactly_the_served_ones(
    doc: dict[str, Any], make_env: Callable[..., ApiEnv]
) -> None:
    validate = validator(doc)
    seen: dict[tuple[str, str], set[int]] = defaultdict(set)

    def record(method: str, endpoint: str, status: int, body: Any) -> None:
        seen[(method.lower(), f"/{endpoint}")].add(status)
        if status >= 400:
            validate(body, "#/components/schemas/ErrorMessages")
        elif endpoint == "vmm.ping":
            validate(body, "#/components/schemas/VmmPingResponse")
        elif endpoint == "vm.info":
            validate(body, "#/components/schemas/VmInfo")
        elif endpoint == "vm.counters":
            validate(body, "#/components/schemas/VmCounters")
        else:
            assert status == 204 and body is None

    env = make_env()  # strato's real builder: failures are real builds that fail
    factory = env.builder
    assert factory is not None
    for method, endpoint, status, body in run_matrix(env):
        record(method, endpoint, status, body)

    def call(method: str, endpoint: str, data: bytes | None = None) -> None:
        status, _reason, raw = env.client.request(method, endpoint, data)
        record(method, endpoint, status, json.loads(raw) if raw else None)

    call("GET", "vmm.ping")
    call("PUT", "vm.create", b"{not json")
    for e in ENDPOINTS:  # a body where none is taken
        if e.body is Body.NONE:
            call(e.method, e.name, b"{}")
        if e.action is None:
            call(e.method, e.name)
    call("PUT", "vm.create", json.dumps(env.config_json()).encode())
    for fail in ("config", "start"):  # boot and reboot that fail to build or start the VM
        factory.fail = fail
        call("PUT", "vm.boot")
        factory.fail = None
        call("PUT", "vm.boot")
        factory.fail = fail
        call("PUT", "vm.reboot")
        factory.fail = None
        call("PUT", "vm.boot")
        call("PUT", "vm.delete")
        call("PUT", "vm.create", json.dumps(env.config_json()).encode())
    call("PUT", "vm.delete")
    call("PUT", "vmm.shutdown")

    buttonless = make_env()  # a real VM without ACPI: no GED, no power button
    assert buttonless.builder is not None
    buttonless.builder.acpi = False
    buttonless.client.create(buttonless.config_json("bench=idle,seconds=600"))
    buttonless.client.boot()
    status, _reason, raw = buttonless.client.request("PUT", "vm.power-button")
    assert status == 500 and "no ACPI power button" in raw.decode()
    record("PUT", "vm.power-button", status, json.loads(raw))

    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert set(op["responses"]) == seen[(method, path)], f"{method.upper()} {path}"
    assert set(ROUTES) == {f"/api/v1{path}" for _m, path in seen}
