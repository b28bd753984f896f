"""Cloud Hypervisor's REST API on a unix socket: the server, its routes, and a client.

    controller = VmmController()          # strato.vmm.controller
    controller.start()
    server = serve_api(controller, "/tmp/strato.sock")
    ...
    server.close(); controller.close()

openapi.yaml (package data) describes exactly what the server serves.
"""

from strato.api.client import ApiClient, ApiError
from strato.api.server import ApiServer, Limits, api_socket_target, serve_api

__all__ = ["ApiClient", "ApiError", "ApiServer", "Limits", "api_socket_target", "serve_api"]
