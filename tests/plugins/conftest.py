"""Fixtures of the plugin tests: a real valkey-server for the limiters' Redis backend, a chain
name per test (so buckets and counters never leak between tests), and a clock moved by hand."""

import uuid

import pytest

from tests.support.clock import FakeClock
from tests.support.valkey import valkey_url

__all__ = ["valkey_url"]


@pytest.fixture
def chain() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
