"""tasktrail: an event-sourced task-status service."""
