"""Opt-in: a kiosk keeps the photos it was unsure about, in a bounded folder, for the next training set,
and a person exports them sorted by predicted label.

Real parts: a real signed bundle served by a sync-server stand-in, the in-process agent, real photos, the
`edge-agent` command line in-process, and a real small tmpfs as a full disk (mounted as root).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import pytest

from edge_runtime.agent import Agent
from edge_runtime.agent.cli import main
from edge_runtime.agent.options import SampleOptions
from edge_runtime.agent.samples import SampleStore, list_samples, parse_since
from tests.agent_fixtures import fill_disk, small_disk  # noqa: F401  (fixtures)
from tests.agent_support import wait_for
from tests.server_fixtures import publisher  # noqa: F401  (fixture)
from tests.test_agent_quality_telemetry import (  # noqa: F401  (fixtures)
    EdgeTruth, bundles, enrolled, options, photos, post_photo, stand_in,
)


def serving_agent(stand_in, bundles, publisher, home: Path, **overrides) -> Agent:  # noqa: ANN001, F811
    stand_in.serve_bundle(bundles.make("m", 1), "m", 1)
    agent = Agent.create_from_options(options(home, **overrides)).start()
    wait_for(lambda: agent.handle.current is not None and agent.handle.current.version == 1, what="v1 served")
    return agent


def test_off_by_default_nothing_is_kept(stand_in, bundles, publisher, photos, tmp_path):  # noqa: F811
    home = enrolled(tmp_path, publisher, stand_in)
    with serving_agent(stand_in, bundles, publisher, home, fallback_threshold=1.0) as agent:  # every answer is unsure
        assert [post_photo(agent.url, photo)[0] for photo in photos[:3]] == [200] * 3
        assert agent.status()["samples"] is None
    assert not (home / "agent" / "samples").exists()
    assert sorted(p.name for p in (home / "agent").iterdir() if "sample" in p.name) == []


def test_on_it_keeps_the_unsure_photos_as_received_and_only_those(stand_in, bundles, publisher, photos, tmp_path):  # noqa: F811
    truth = EdgeTruth(bundles.make("m", 1), publisher.public_key, photos)
    threshold = truth.threshold_splitting(0.5)
    unsure = [i for i, (_, _, score) in enumerate(truth.top) if score < threshold]
    home = enrolled(tmp_path, publisher, stand_in)
    kept_in = tmp_path / "kept"
    with serving_agent(stand_in, bundles, publisher, home, fallback_threshold=threshold,
                       samples=SampleOptions(folder=kept_in, max_bytes=50 * 1024 * 1024)) as agent:
        assert [post_photo(agent.url, photo)[0] for photo in photos] == [200] * len(photos)
        assert agent.samples.flush()
        status = agent.status()["samples"]
    kept = list_samples(kept_in)
    assert [s.photo.read_bytes() for s in kept] == [photos[i] for i in unsure], "the unsure photos, byte for byte, in order"
    assert status["count"] == status["kept"] == len(unsure) and status["skipped"] == {"busy": 0, "disk": 0, "too_large": 0}
    for sample, i in zip(kept, unsure):
        index, label, score = truth.top[i]
        assert (sample.meta["model"], sample.meta["version"], sample.label, sample.meta["label_index"]) == ("m", 1, label, index)
        assert sample.meta["score"] == score < threshold
        assert sample.meta["pixels_sha256"] == hashlib.sha256(truth.pixels[i].tobytes()).hexdigest()
        assert sample.meta["spec_digest"] == truth.spec.pixels_digest()
    assert sorted(p.suffix for p in kept_in.iterdir()) == sorted([".json"] * len(unsure) + [s.photo.suffix for s in kept])


def test_the_byte_budget_drops_the_oldest_first(stand_in, bundles, publisher, photos, tmp_path):  # noqa: F811
    home = enrolled(tmp_path, publisher, stand_in)
    budget = sum(len(p) for p in photos[-4:]) + 4 * 1024  # room for about the last four photos and their sidecars
    kept_in = tmp_path / "kept"
    with serving_agent(stand_in, bundles, publisher, home, fallback_threshold=1.0,
                       samples=SampleOptions(folder=kept_in, max_bytes=budget)) as agent:
        for photo in photos:
            assert post_photo(agent.url, photo)[0] == 200
            assert agent.samples.flush()  # one at a time, so "oldest" is the order they came in
        status = agent.status()["samples"]
    kept = list_samples(kept_in)
    on_disk = sum(p.stat().st_size for p in kept_in.iterdir())
    assert on_disk <= budget and status["bytes"] == on_disk
    assert 0 < len(kept) < len(photos)
    assert [s.photo.read_bytes() for s in kept] == photos[-len(kept):], "the newest stay, the oldest went"
    assert status["dropped_oldest"] == len(photos) - len(kept) == status["kept"] - status["count"]


def test_export_sorts_them_into_label_folders_with_a_manifest_and_lists_them(stand_in, bundles, publisher, photos, tmp_path,
                                                                             capsys):  # noqa: F811
    truth = EdgeTruth(bundles.make("m", 1), publisher.public_key, photos[:5])
    home = enrolled(tmp_path, publisher, stand_in)
    with serving_agent(stand_in, bundles, publisher, home, fallback_threshold=1.0,
                       samples=SampleOptions(folder=home / "agent" / "samples")) as agent:
        for photo in photos[:5]:
            assert post_photo(agent.url, photo)[0] == 200
        assert agent.samples.flush()

    assert main(["samples", "--home", str(home)]) == 0
    listing = capsys.readouterr().out
    labels = {label for _, label, _ in truth.top}
    assert listing.startswith(f"5 samples, ") and all(f"  {label}" in listing for label in labels)
    assert main(["samples", "--home", str(home), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == {label: sum(1 for _, l, _ in truth.top if l == label) for label in labels}

    dest = tmp_path / "training-set"
    assert main(["samples", "--home", str(home), "export", str(dest)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"exported 5 photos to {dest} (") and f"manifest {dest / 'manifest.jsonl'}" in out
    lines = [json.loads(line) for line in (dest / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 5
    for line, photo, (_, label, _) in zip(lines, photos[:5], truth.top):
        assert line["file"].startswith(label + "/") and line["label"] == label
        assert (dest / line["file"]).read_bytes() == photo
    assert sorted(p.name for p in dest.iterdir()) == sorted([*labels, "manifest.jsonl"])

    assert main(["samples", "--home", str(home), "export", str(dest)]) == 0
    assert capsys.readouterr().out.startswith(f"exported 0 photos to {dest}; 5 already there")
    assert len((dest / "manifest.jsonl").read_text().splitlines()) == 5, "nothing listed twice"
    assert main(["samples", "--home", str(home), "export", str(tmp_path / "later"), "--since", "1h"]) == 0
    assert capsys.readouterr().out.startswith("exported 5 photos")
    assert main(["samples", "--home", str(home), "export", str(tmp_path / "none"), "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out.startswith("exported 0 photos")
    assert main(["samples", "--home", str(home), "export", str(dest), "--since", "yesterday"]) == 2
    assert "--since takes a date (2026-12-01)" in capsys.readouterr().err


def test_run_refuses_a_budget_without_the_option_in_one_line(tmp_path, capsys):
    assert main(["run", "--home", str(tmp_path), "--keep-max-mb", "10"]) == 2
    assert capsys.readouterr().err.strip() == "edge-agent run: error: --keep-max-mb needs --keep-low-confidence DIR|on"
    assert main(["run", "--home", str(tmp_path), "--keep-low-confidence", "on", "--keep-max-mb", "0"]) == 2
    assert capsys.readouterr().err.strip() == "edge-agent: error: --keep-max-mb must be a positive number, got 0"


def test_a_restart_removes_what_a_kill_left_half_written(tmp_path):
    folder = tmp_path / "kept"
    folder.mkdir()
    (folder / ".tmp-01700000000000000000-v1-0123abcd.jpg").write_bytes(b"half a photo")
    (folder / "01700000000000000001-v1-0123abcd.jpg").write_bytes(b"a photo whose sidecar never came")
    (folder / "notes.txt").write_text("someone else's file stays")
    store = SampleStore(folder, 1 << 20)
    store.close()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert store.status()["count"] == 0


def test_since_takes_dates_times_and_ages():
    now = time.time()
    assert parse_since("90m", now=now) == now - 5400 and parse_since("7d", now=now) == now - 7 * 86400
    assert parse_since("2026-12-01T09:30+00:00") == 1796117400.0
    with pytest.raises(ValueError, match="--since takes"):
        parse_since("last tuesday")


# --- a full disk: the photo is skipped and counted, the request never knows -----------------------------------


def test_a_full_disk_skips_the_photo_counts_it_and_never_fails_the_request(stand_in, bundles, publisher, photos, tmp_path,
                                                                           small_disk):  # noqa: F811
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("edge_agent.samples").addHandler(handler)
    home = enrolled(tmp_path, publisher, stand_in)
    kept_in = small_disk / "kept"
    with serving_agent(stand_in, bundles, publisher, home, fallback_threshold=1.0,
                       samples=SampleOptions(folder=kept_in, max_bytes=64 * 1024 * 1024)) as agent:
        filler = fill_disk(small_disk)  # something else on the device fills the disk to the last byte
        answers = [post_photo(agent.url, photo) for photo in photos[:4]]
        assert [status for status, _ in answers] == [200] * 4 and all(body["label"] for _, body in answers)
        assert agent.samples.flush()
        status = agent.status()["samples"]
        assert status["skipped"]["disk"] == 4 and status["count"] == 0
        assert list(kept_in.iterdir()) == [], "no half-written file is left on the full disk"
        assert sum("cannot keep low-confidence photos in" in line for line in said) == 1, "said once, not per photo"

        filler.unlink()
        assert post_photo(agent.url, photos[4])[0] == 200
        assert agent.samples.flush()
        assert [s.photo.read_bytes() for s in list_samples(kept_in)] == [photos[4]], "kept again once there is room"
    logging.getLogger("edge_agent.samples").removeHandler(handler)
