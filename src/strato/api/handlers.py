"""From a parsed request to a controller action and back to a reply.

Errors follow Cloud Hypervisor's http/mod.rs: the body is a JSON array of messages, outermost
first ("Error from API", "The VM could not be paused", ...), and the status comes from the
controller's VmmError (404 for "not created", 400 for an invalid config, 500 otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from strato.api.routes import Endpoint
from strato.vmm.config_json import ConfigJsonError, vm_config_from_json
from strato.vmm.controller import Action, VmmController, VmmError


@dataclass(frozen=True)
class Reply:
    status: int
    value: object = None  # the JSON body of a 200
    errors: list[str] | None = None  # the error messages of a 4xx/5xx


ReplyFn = Callable[[Reply], None]


class BodyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BodyError(f"duplicate field `{key}`")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise BodyError(f"{name} is not valid JSON")


def loads_strict(raw: bytes) -> Any:
    """JSON as serde_json reads it: UTF-8, no NaN/Infinity, no duplicate keys."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(f"the body is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except json.JSONDecodeError as e:
        raise BodyError(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise BodyError("the JSON document is nested too deeply") from None
    except ValueError as e:  # e.g. an integer with too many digits
        raise BodyError(str(e)) from None


def _error_reply(error: VmmError) -> Reply:
    return Reply(error.status, errors=["Error from API", *error.messages])


class ApiHandler:
    """Turns requests for implemented endpoints into controller actions."""

    def __init__(self, controller: VmmController) -> None:
        self.controller = controller

    def handle(self, endpoint: Endpoint, body: bytes, reply: ReplyFn) -> None:
        """Answer through `reply`, now (bad input) or from the VMM thread (the action ran)."""
        if endpoint.action is None:
            reply(
                Reply(
                    501,
                    errors=["Not Implemented", f"{endpoint.name} is not implemented by strato yet"],
                )
            )
            return
        arg: object = None
        if endpoint.action is Action.CREATE:
            try:
                arg = vm_config_from_json(loads_strict(body))
            except (BodyError, ConfigJsonError) as e:
                reply(Reply(400, errors=["Failed to deserialize JSON", str(e)]))
                return

        def done(result: object, error: VmmError | None) -> None:
            if error is not None:
                reply(_error_reply(error))
            elif endpoint.ok_status == 200:
                reply(Reply(200, value=result))
            else:
                reply(Reply(endpoint.ok_status))

        self.controller.submit(endpoint.action, arg, done)
