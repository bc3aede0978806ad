"""Shared fixtures: each test session gets its own DDS domains so parallel runs never cross-talk."""

from __future__ import annotations

import itertools
import os

import pytest

# Domains 1..100 are spread over concurrent test sessions by pid; each graph test takes the next
# one, so a leftover process from one test cannot talk to the next.
_BASE = 1 + (os.getpid() % 25) * 4
_domains = itertools.count()


@pytest.fixture
def domain_id() -> int:
    """A DDS domain id for this test alone (within this session)."""
    return 1 + (_BASE - 1 + next(_domains)) % 100
