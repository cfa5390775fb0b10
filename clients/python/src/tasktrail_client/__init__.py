"""A client for tasktrail, the event-sourced task-status service (depends on httpx only).

from tasktrail_client import Client

client = Client("http://127.0.0.1:8000", api_key=None)
task = client.create("document_process", {"file_path": "/tmp/test.pdf"})
with client.run(task.task_id) as run:     # a worker: running, progress, then completed or failed
    run.progress(50)
    run.result = {"files_processed": 10}
"""

from tasktrail_client._flows import RetryPolicy
from tasktrail_client.aio import AsyncClient, AsyncRun
from tasktrail_client.client import Client, Run
from tasktrail_client.errors import (
    ApiError,
    BadRequest,
    Conflict,
    ConnectionFailed,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    ServerError,
    ServiceUnavailable,
    TasktrailError,
    Unauthorized,
    UnsupportedMediaType,
    ValidationFailed,
)
from tasktrail_client.models import Change, Event, History, ItemResult, Stats, Task

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncRun",
    "BadRequest",
    "Change",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "Event",
    "Forbidden",
    "History",
    "ItemResult",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "RetryPolicy",
    "Run",
    "ServerError",
    "ServiceUnavailable",
    "Stats",
    "Task",
    "TasktrailError",
    "Unauthorized",
    "UnsupportedMediaType",
    "ValidationFailed",
]
