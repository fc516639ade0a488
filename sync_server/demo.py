"""The demo's last act: start a server on embedded defaults, publish the demo bundle, ask its full model.

`run_demo` starts uvicorn on a free local port in a background thread, publishes the bundle and its
SavedModel over the HTTP API (channel `stable`), sends one photo to the fallback endpoint, and stops
the server. `sync-server demo` calls it after training and converting. The SavedModel to pass is the
TF Serving version `edge-convert --serving-repo REPO` wrote with the bundle (REPO/NAME/VERSION): its
warm-up records and `pixels` signature are signed in the bundle's manifest, so the version starts warm
and takes uint8 pixels; the training export works too, without them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import ServerConfig
from .errors import ConfigError


@dataclass(frozen=True)
class DemoResult:
    url: str
    data_dir: Path
    published: dict[str, Any]
    prediction: dict[str, Any]
    startup_s: float
    publish_s: float
    predict_s: float

    def summary(self) -> str:
        model = self.prediction["model"]
        top = ", ".join(f"{c['label']} {c['score']:.2f}" for c in self.prediction["top_k"])
        state = "published" if self.published.get("created") else "already published"
        return (
            f"sync-server on {self.url} (data in {self.data_dir}, started in {self.startup_s:.1f} s): "
            f"{model['name']} version {model['version']} {state} to channel stable in {self.publish_s:.1f} s; "
            f"fallback prediction in {self.predict_s * 1000:.0f} ms: {top}"
        )


def run_demo(config: ServerConfig, bundle: Path, saved_model: Path, photo: Path, *, top_k: int = 3) -> DemoResult:
    """Start, publish, predict, stop; raises a SyncServerError subclass when a step fails."""
    import uvicorn

    from .app import create_app
    from .client import SyncServerClient

    try:
        photo_bytes = Path(photo).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the demo photo {photo}: {exc.strerror or exc}") from None
    config = replace(config, host="127.0.0.1", port=config.port).with_secrets()
    started = time.perf_counter()
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False, log_level="warning"))
    thread = threading.Thread(target=server.run, name="sync-server-demo", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError("the demo server did not start (see the log above)")
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        startup = time.perf_counter() - started
        with SyncServerClient(url, config.admin_token or "") as client:
            t0 = time.perf_counter()
            published = client.publish(Path(bundle), Path(saved_model), channel="stable")
            t1 = time.perf_counter()
            prediction = client.predict(published["name"], photo_bytes, channel="stable", top_k=top_k)
            t2 = time.perf_counter()
        return DemoResult(url, config.data_dir, published, prediction, startup, t1 - t0, t2 - t1)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
