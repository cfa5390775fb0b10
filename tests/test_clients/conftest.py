"""The client tests share one real server per module; each test keeps to task types of its own."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(scope="module")
def server(shared_server: str) -> str:
    return shared_server


@pytest.fixture
def kind() -> str:
    """A task type no other test uses, so lists and counts can be filtered to this test's tasks."""
    return f"t{uuid.uuid4().hex[:12]}"
