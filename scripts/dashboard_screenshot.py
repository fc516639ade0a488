"""Save a screenshot of the dashboard for the README: a demo fleet in a real server, in headless Chromium.

    .venv/bin/python scripts/dashboard_screenshot.py [--out docs/dashboard.png] [--chromium /usr/bin/chromium]

Trains the tests' tiny model (seconds), converts it, publishes v1 and v2 (both with a baseline) into a
fresh data directory with twelve hours of telemetry from a dozen kiosks (v2 drifts in the last four
hours and its rollout is paused with a reason), starts `sync-server serve` on it, logs in and saves
the model page.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PAUSE_REASON = "low-confidence answers up from 7 % to 20 % on v2 in four hours; class 'mug' over-predicted"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png", help="PNG to write (default docs/dashboard.png)")
    parser.add_argument("--chromium", type=Path, default=Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")))
    parser.add_argument("--width", type=int, default=1360)
    parser.add_argument("--height", type=int, default=1500, help="height of the saved part of the page, in CSS pixels")
    args = parser.parse_args(argv)
    if not args.chromium.is_file():
        print(f"dashboard_screenshot: no Chromium at {args.chromium} (apt-get install chromium, or --chromium PATH)", file=sys.stderr)
        return 2
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("dashboard_screenshot: Playwright is not installed (pip install -e '.[dev]')", file=sys.stderr)
        return 2

    from converter import ConvertOptions, SigningOptions, ValidationOptions, convert, write_keypair
    from edge_demo.synthetic import GeneratorOptions, generate_dataset
    from edge_demo.train import train
    from tests.dashboard_demo import MODEL, baseline_bundles, seed
    from tests.model_fixtures import DEMO_SPLITS, tiny_train_options
    from tests.server_fixtures import ADMIN_TOKEN, ENROLLMENT_SECRET, serve_process, server_config

    with tempfile.TemporaryDirectory(prefix="dashboard-shot-") as tmp:
        root = Path(tmp)
        print("==> training and converting the tiny demo model")
        generate_dataset(root / "photos", GeneratorOptions(seed=0, splits=DEMO_SPLITS, long_side=(320, 480), large_fraction=0.0))
        saved_model = train(root / "photos", root / "model", tiny_train_options()).export_dir
        private, public = write_keypair(root / "publisher")
        first = convert(saved_model, ConvertOptions(out=root / "v1", validation=ValidationOptions(skip=True),
                                                    signing=SigningOptions(key=private), name=MODEL, version=1)).bundle
        bundles = baseline_bundles(first, public, private, root)
        print("==> seeding the demo fleet")
        data = root / "data"
        seed(server_config(data, None, None, publisher_keys=(public,)), bundles, saved_model, devices=12, percent=40,
             hours=12, drift_from_h=4, pause_reason=PAUSE_REASON, lost_device=True)
        serve = ["--data-dir", str(data), "--admin-token", ADMIN_TOKEN, "--enrollment-secret", ENROLLMENT_SECRET,
                 "--publisher-keys", str(public), "--embedded-preload", "off", "--log-format", "text"]
        with serve_process(serve, root / "server.log", ready_path="/healthz", ready_timeout_s=60) as (url, _process):
            print(f"==> {url}/dashboard/models/{MODEL} in Chromium")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(args.chromium))
                try:
                    page = browser.new_page(viewport={"width": args.width, "height": args.height}, device_scale_factor=1)
                    page.goto(f"{url}/dashboard/login?next=/dashboard/models/{MODEL}%3Fhours%3D24")
                    page.fill("#token", ADMIN_TOKEN)
                    page.click("button[type=submit]")
                    page.wait_for_url(f"{url}/dashboard/models/{MODEL}?hours=24")
                    page.wait_for_selector("#charts[data-drawn]", state="attached", timeout=15_000)  # no eval: the CSP forbids it
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(args.out), clip={"x": 0, "y": 0, "width": args.width, "height": args.height})
                finally:
                    browser.close()
    print(f"==> wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
