"""Fixtures of the plugin tests: a real valkey-server for the distributed rate limiter."""

from tests.support.valkey import valkey_url

__all__ = ["valkey_url"]
