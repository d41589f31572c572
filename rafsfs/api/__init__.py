"""The nydusd-compatible HTTP API on a unix socket, served by every rafsfs daemon, and a small client.

``server.ApiServer`` answers the requests nydus-snapshotter makes of the nydusd it launches (daemon state, metrics,
mount and blob management) and the ones ``rafsfs stats`` makes; ``client.ApiClient`` speaks to it.
"""
from .client import ApiClient
from .model import ApiError, DaemonState, build_info, default_apisock
from .server import ApiServer, serve_api

__all__ = ["ApiClient", "ApiError", "ApiServer", "DaemonState", "build_info", "default_apisock", "serve_api"]
