"""One real server for a module's client tests; each test keeps to task types of its own."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import Server, assert_verifies, fresh_database


@pytest.fixture(scope="module")
def server(server_url: str, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `tasktrail serve` on a fresh database, shared by the module; its base URL."""
    with fresh_database(server_url, template_db) as url:
        process = Server(os.environ | {"DATABASE_URL": url}, log_dir=tmp_path_factory.mktemp("server"))
        yield process.url
        process.stop()
        assert_verifies(url)


@pytest.fixture
def kind() -> str:
    """A task type no other test uses, so lists and counts can be filtered to this test's tasks."""
    return f"t{uuid.uuid4().hex[:12]}"
