"""schemathesis against the service's own OpenAPI schema, on a real server: no 5xx, no response off the schema."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from tasktrail.http import auth
from tasktrail.http.app import create_app
from tests.conftest import Server, assert_verifies, fresh_database
from tests.prom import scrape

# The schema the app builds is the one it serves (checked below); building it
# needs no database, so the tests can be generated at collection time.
OPENAPI = create_app("postgresql://unused", api_keys=[]).openapi_schema.to_schema()

# The server requires keys: schemathesis sends this one and also checks that
# each secured route refuses a request without it.
ADMIN_KEY = auth.new_key()
KEYS = auth.Key("fuzzer", "admin", auth.digest(ADMIN_KEY)).entry()
# A request that hangs fails instead of stalling the suite.
CONFIG = SchemathesisConfig.from_dict({"request-timeout": 10, "auth": {"openapi": {"apiKey": {"bearer": ADMIN_KEY}}}})


def streams(ctx: Any) -> bool:
    """An endless Server-Sent Events stream has no last byte to check; its own tests cover it."""
    responses = ctx.operation.definition.raw.get("responses", {})
    return any("text/event-stream" in response.get("content", {}) for response in responses.values())


VALID_KEY = re.compile("[\\x21-\\x7e]{1,255}")

schema = schemathesis.openapi.from_dict(OPENAPI, config=CONFIG).exclude(streams)


@pytest.fixture(scope="module")
def fuzzed_server(server_url: str, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with fresh_database(server_url, template_db) as url:
        env = os.environ | {"DATABASE_URL": url, "TASKTRAIL_API_KEYS": KEYS}
        server = Server(env, log_dir=tmp_path_factory.mktemp("fuzz"))
        try:
            yield server
            # The key worked: routes that need it answered 2xx, the run did not just collect 401s. (Not "it
            # created tasks": under xdist each worker runs a share of the cases, perhaps no create that stays.)
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
                answered = scrape(client).samples
        finally:
            server.stop()  # whatever happened, the server this fixture started goes
        public = ("/health", "/schema", "/ui")  # and "/": what answers without a key
        keyed = [
            value
            for (name, labels), value in answered.items()
            if name == "tasktrail_http_requests_total"
            and dict(labels)["status"].startswith("2")
            and not (dict(labels)["route"].startswith(public) or dict(labels)["route"] == "/")
        ]
        assert sum(keyed) > 0, answered
        assert "Traceback" not in server.log(), server.log()
        assert_verifies(url)


def test_the_server_serves_this_schema(fuzzed_server: Server) -> None:
    served = httpx.get(f"{fuzzed_server.url}/schema/openapi.json", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert served.json() == OPENAPI


@schema.parametrize()
@settings(max_examples=15, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_the_api_keeps_to_its_schema(case: schemathesis.Case, fuzzed_server: Server) -> None:
    key = (case.headers or {}).get("Idempotency-Key")
    if key is not None and VALID_KEY.fullmatch(key):
        # A key reused with another body (or on the other create route) is a documented 422: give each case
        # its own key, of the same length up to the longest allowed (invalid ones stay invalid).
        case.headers["Idempotency-Key"] = key[:223] + uuid.uuid4().hex
    case.call_and_validate(base_url=fuzzed_server.url)
