"""How the built-ins that call other services (``external_validator``, ``audit_log``'s HTTP sink,
``auth``'s JWKS fetch) describe a call that failed: one log line naming the endpoint without
credentials or query, and the error's class and message. An unreachable service fails every
request it is asked about; a traceback per request would bury the logs, so it is written only
when the logger is at DEBUG."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit


def safe_endpoint(url: str) -> str:
    """``url`` fit for logs and error messages: no user info, query or fragment (each may hold a token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def describe_error(error: BaseException, url: str | None = None) -> str:
    """``ErrorClass: message`` of a failed call (the class alone when there is no message), with
    ``url``, should the message quote it, shown as its :func:`safe_endpoint`."""
    detail = str(error)
    if url and detail:
        detail = detail.replace(url, safe_endpoint(url))
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def traceback_if_debug(logger: logging.Logger, error: BaseException) -> BaseException | None:
    """What to pass as ``exc_info`` with a failed call's line: the error (its traceback and the
    causes chained to it) only when ``logger`` writes DEBUG lines."""
    return error if logger.isEnabledFor(logging.DEBUG) else None
