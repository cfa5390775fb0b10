"""Reading what GET /metrics answers, with prometheus_client's own parser, for tests and benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

# Every family SPEC §11 names, as the text format shows it (counters with _total), and its labels.
FAMILIES = {
    "tasktrail_http_requests": ("counter", {"method", "route", "status"}),
    "tasktrail_http_request_duration_seconds": ("histogram", {"method", "route"}),
    "tasktrail_events_appended": ("counter", {"type"}),
    "tasktrail_write_conflicts": ("counter", set()),
    "tasktrail_tasks": ("gauge", {"status"}),
    "tasktrail_db_pool_connections": ("gauge", {"state"}),
    "tasktrail_stream_clients": ("gauge", set()),
    "tasktrail_feed_held_back_seconds": ("gauge", set()),
    "tasktrail_db_unavailable": ("counter", set()),
    "tasktrail_projection_version": ("gauge", {"name"}),
}


class Scrape:
    """One scrape: its families, and its samples by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in self.families.values()
            for sample in family.samples
        }

    def value(self, name: str, /, **labels: str) -> float:
        """A sample's value; 0 for a series not there yet (a counter that has not moved)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def series(self, name: str) -> list[dict[str, str]]:
        """The label sets of a sample name."""
        return [dict(labels) for sample_name, labels in self.samples if sample_name == name]

    def total(self, name: str, /, **labels: str) -> float:
        """The sum of a sample over every series whose labels include these."""
        wanted = set(labels.items())
        return sum(value for (sample_name, got), value in self.samples.items() if sample_name == name and wanted <= got)


def scrape(client: httpx.Client, headers: Mapping[str, str] | None = None) -> Scrape:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def wait_for_scrape(
    client: httpx.Client,
    condition: Callable[[Scrape], bool],
    timeout: float = 15,
    headers: Mapping[str, str] | None = None,
) -> Scrape:
    """Scrape until the condition holds (the server's processes work on their own schedule); the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        got = scrape(client, headers)
        if condition(got):
            return got
        assert time.monotonic() < deadline, f"the condition did not come true; last scrape:\n{got.text}"
        time.sleep(0.05)
