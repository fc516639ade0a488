"""The operators' dashboard, served by sync-server under /dashboard.

Log in with the admin token (a signed, HttpOnly, SameSite=Strict session cookie); see models, their
versions, channels and rollouts, the devices per version (online, stalled), and charts over time per
version (fallback and low-confidence rates, disagreement, drift, latency, devices). Promote, pause,
resume and roll back a rollout, move a shadow rollout to canary or change its percent, each after a
confirmation page, with CSRF-checked POSTs; a step the quality gates refuse shows why, and may be forced.

Pages are rendered on the server (Jinja2); the charts are Chart.js, served from `static/` with the
package (no CDN, no build step; see static/VENDORED.md); their data comes from `series.json`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["install", "PREFIX"]

PREFIX = "/dashboard"


def install(app: Any) -> None:
    """Add the dashboard's routes and static files to the sync-server `app` (needs `app.state.services`)."""
    from starlette.staticfiles import StaticFiles

    from ._routes import HERE, Dashboard, router

    app.state.dashboard = Dashboard(app.state.services.config.admin_token or "")
    app.include_router(router)
    app.mount(PREFIX + "/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")
