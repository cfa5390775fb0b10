"""The client tests share one real server; each test keeps to task types of its own."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import Server, assert_verifies, fresh_database
from tests.test_faults.test_database import own_postgres  # noqa: F401 -- a fixture: PostgreSQL to stop and start


@pytest.fixture(scope="session")
def server(shared_server: str) -> str:
    return shared_server


@pytest.fixture
def kind() -> str:
    """A task type no other test uses, so lists and counts can be filtered to this test's tasks."""
    return f"t{uuid.uuid4().hex[:12]}"


NAMES = {"read": "reader", "write": "worker", "admin": "operator"}  # a key's name, by scope


@dataclass(frozen=True)
class Keyed:
    """A real server with API keys: one key per scope (named as NAMES says)."""

    url: str
    keys: dict[str, str]  # scope -> key


@pytest.fixture(scope="session")
def keyed_server(server_url: str, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    keys = {scope: scope[0] * 43 for scope in NAMES}
    entries = ",".join(f"{NAMES[s]}:{s}:{hashlib.sha256(key.encode()).hexdigest()}" for s, key in keys.items())
    with fresh_database(server_url, template_db) as url:
        env = os.environ | {"DATABASE_URL": url, "TASKTRAIL_API_KEYS": entries}
        process = Server(env, log_dir=tmp_path_factory.mktemp("keyed"))
        yield Keyed(process.url, keys)
        process.stop()
        assert_verifies(url)
