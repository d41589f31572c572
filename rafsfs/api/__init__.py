"""The nydusd-compatible HTTP API on a unix socket, served by every rafsfs daemon, and a small client.

``server.ApiServer`` answers the requests nydus-snapshotter makes of the nydusd it launches (daemon state, metrics,
mount and blob management) and the ones ``rafsfs stats`` makes; ``client.ApiClient`` speaks to it.
"""
from .model import ApiError, DaemonState, build_info, default_apisock
from .server import ApiServer, serve_api


def __getattr__(name: str):
    # the client (http.client, ssl) is imported on first use: a daemon starting up serves, it doesn't ask
    if name == "ApiClient":
        from .client import ApiClient
        return ApiClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["ApiClient", "ApiError", "ApiServer", "DaemonState", "build_info", "default_apisock", "serve_api"]
