"""The operator console: a page and its scripts, served by newsmon on the API's own port.

The page is static (``static/``: HTML, one stylesheet, one script, no build step) and draws
everything from the JSON API, as any other client would: it imports no service. Its routes
are the page, its assets and the login that turns an API key into a session cookie; see
``routes``.
"""

from newsmon.console.routes import CSP, build_router

__all__ = ["CSP", "build_router"]
