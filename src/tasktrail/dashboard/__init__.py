"""The dashboard operators watch (SPEC §10): server-rendered pages, made live by one small script of ours.

routes.py serves the pages; templates/ holds their HTML (the one definition of
every `data-*` hook); static/ holds our script and stylesheet, and vendor/ the
pinned third-party bundles the API docs pages load, each with its licence.
"""

from tasktrail.dashboard.routes import router

__all__ = ["router"]
