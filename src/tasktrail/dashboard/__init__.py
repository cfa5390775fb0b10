"""The dashboard operators watch (SPEC §10): server-rendered pages, made live by one small script of ours.

routes.py serves the pages; templates/ holds their HTML (with routes.task_row,
the one definition of every `data-*` hook); static/ holds our script and
stylesheet (and live-worker.js, the stream that pages past the first two
of a browser share), and static/vendor/ the pinned third-party bundle the API
docs page loads, with its licence.

Why a script of our own (static/dashboard.js, plain EventSource and fetch) and
not htmx with its SSE extension: the extension swaps one server fragment per
event, but a write storm brings thousands of events a second, and the page must
coalesce them into a few updates a second, keep its size bounded, keep focus
and ticked boxes, and run bulk actions with progress. That is a few hundred
lines either way; written plainly, they need no third-party code in the page,
and no inline script or style that a `script-src 'self'` policy would refuse
(htmx injects an indicator style unless configured off).
"""

from tasktrail.dashboard.routes import router

__all__ = ["router"]
