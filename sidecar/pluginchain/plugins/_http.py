"""What the built-ins that call out over HTTP check of the URLs they are given."""

from __future__ import annotations

from urllib.parse import urlsplit


def check_http_url(url: str, field: str) -> str:
    """``url`` if it is an http(s) URL with a host and a valid port; else ValueError naming
    ``field``. The URL is not echoed: it may carry credentials or tokens."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises on a malformed port
    except ValueError as error:
        raise ValueError(f"{field} is not a valid URL ({error})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{field} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{field} has no host")
    return url
