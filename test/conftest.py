"""Shared fixtures: every graph test runs on a DDS domain that no other process holds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vla_ros.testing import reserved_domain


@pytest.fixture
def domain_id() -> Iterator[int]:
    """A DDS domain id reserved for this test alone (across concurrent test sessions too)."""
    with reserved_domain() as domain:
        yield domain
