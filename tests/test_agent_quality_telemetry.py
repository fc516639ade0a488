"""A kiosk reports what drift needs: per version and period, the predicted classes, how many answers
were unsure, how often the server's full model disagreed, and the input statistics of the photos.

Real parts: a real signed bundle served by a sync-server stand-in (which also plays the server's full
model, answering from a script), the in-process agent and a real agent process killed with SIGKILL,
real photos. The expected figures come from the same bundle run directly on the same photos.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from edge_runtime.agent import Agent, AgentOptions, AgentPaths, RetryOptions, ServeOptions, TimeoutOptions
from edge_runtime.agent.config import Identity, save_identity
from edge_runtime.agent.outbox import Outbox
from edge_runtime.agent.telemetry import PeriodStats, TelemetryRecorder, pixel_sums
from preprocessing import InputStats, preprocess_pixels
from tests.agent_fixtures import bundles, stand_in  # noqa: F401  (fixtures)
from tests.agent_support import ROOT, device_home, wait_for
from tests.baseline_fixtures import validated_bundle  # noqa: F401  (fixture)
from tests.conftest import real_photo_path
from tests.misbehaving_server import MisbehavingServer
from tests.server_fixtures import publisher  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def photos(demo_dataset) -> list[bytes]:
    """Real photos: the demo data set's test JPEGs and a few of scikit-image's PNGs."""
    jpegs = sorted((demo_dataset / "test").rglob("*.jpg"))[:10]
    pngs = [real_photo_path(name) for name in ("chelsea.png", "coffee.png", "camera.png")]
    return [path.read_bytes() for path in [*jpegs, *pngs]]


class EdgeTruth:
    """What the bundle answers on each photo when run directly (no agent), and the pixels it ran."""

    def __init__(self, bundle: Path, public_key: Path, photos: list[bytes]) -> None:
        from edge_runtime.classifier import Classifier, ClassifierOptions

        with Classifier.create_from_options(ClassifierOptions(model=bundle, public_key=public_key, top_k=6)) as classifier:
            self.labels = classifier.labels
            self.spec = classifier.spec
            answers = [classifier.classify(photo)[0][0] for photo in photos]
        self.top = [(self.labels.index(a.label), a.label, a.score) for a in answers]
        self.pixels = [preprocess_pixels(photo, self.spec) for photo in photos]

    def threshold_splitting(self, share: float = 0.5) -> float:
        """A threshold with about `share` of the photos below it (midway between two distinct scores)."""
        scores = sorted({score for _, _, score in self.top})
        assert len(scores) >= 2, "the photos must not all score the same"
        cut = max(1, min(len(scores) - 1, round(len(scores) * share)))
        return (scores[cut - 1] + scores[cut]) / 2

    def input_stats(self, indexes: range | list[int] | None = None) -> InputStats:
        stats = InputStats()
        for i in indexes if indexes is not None else range(len(self.pixels)):
            stats.add(self.pixels[i])
        return stats


def enrolled(tmp_path: Path, publisher, server: MisbehavingServer) -> Path:  # noqa: F811
    home = device_home(tmp_path, publisher)
    save_identity(AgentPaths.at(home), Identity(server=server.url, device_id=server.device_id, token="token", model="m",
                                                channel="stable", name="kiosk-quality"))
    return home


def options(home: Path, **overrides) -> AgentOptions:
    values = dict(home=home, serve=ServeOptions(port=0), poll_interval_s=0.2, push=False,
                  retry=RetryOptions(attempts=3, base_s=0.05, max_s=0.5),
                  timeouts=TimeoutOptions(request_s=5, download_s=5, stream_s=5, fallback_s=2, exchange_s=5),
                  telemetry_period_s=0.5, fallback="never")
    values.update(overrides)
    return AgentOptions(**values)


def post_photo(url: str, photo: bytes) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=10)
    try:
        connection.request("POST", "/classify", body=photo)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def telemetry(server: MisbehavingServer) -> list[dict]:
    """The telemetry reports the stand-in received, each once (a report resent after a kill is the same body)."""
    unique = {json.dumps(body, sort_keys=True): body for path, body in list(server.reports) if path.endswith("/telemetry")}
    return list(unique.values())


def summed(reports: list[dict]) -> dict:
    """The serving reports added up as the server would: counts, class counts, merged input stats."""
    total = {"reports": 0, "predictions": 0, "errors": 0, "fallbacks": 0, "low_confidence": 0, "fallback_answers": 0,
             "disagreements": 0, "class_counts": [], "input": InputStats()}
    for report in reports:
        assert report.get("mode", "serving") == "serving"
        total["reports"] += 1
        for key in ("predictions", "errors", "fallbacks", "low_confidence", "fallback_answers", "disagreements"):
            total[key] += report[key]
        counts = report["class_counts"]
        total["class_counts"] += [0] * (len(counts) - len(total["class_counts"]))
        for i, n in enumerate(counts):
            total["class_counts"][i] += n
        if "input_stats" in report:
            total["input"] = total["input"].merge(InputStats.from_report(report["input_stats"]))
    return total


def scripted_answers(labels: list[str]):
    """A behaviour for the stand-in's predict routes: the n-th request gets labels[n] as the server's top-1."""
    served = []

    def behave(handler, _normal) -> None:  # noqa: ANN001
        label = labels[min(len(served), len(labels) - 1)]
        served.append(handler.path)
        body = json.dumps({"model": {"name": "m", "version": 1}, "top_k": [{"label": label, "score": 0.93}]}).encode()
        handler.answer(200, {"Content-Type": "application/json"}, body)

    behave.served = served  # type: ignore[attr-defined]
    return behave


# --- the story: a day of photos, some unsure, the server asked and sometimes of another opinion ------------


def test_the_report_holds_class_counts_low_confidence_disagreements_and_the_input_stats_of_the_photos(
        stand_in, bundles, publisher, photos, tmp_path, monkeypatch):  # noqa: F811
    import preprocessing._prepare as prepare_module

    bundle = bundles.make("m", 1)
    truth = EdgeTruth(bundle, publisher.public_key, photos)
    threshold = truth.threshold_splitting(0.5)
    unsure = [i for i, (_, _, score) in enumerate(truth.top) if score < threshold]
    assert 0 < len(unsure) < len(photos)
    # The server's full model agrees on every other unsure photo and names another label on the rest.
    other = {label: next(x for x in truth.labels if x != label) for label in truth.labels}
    server_labels = [truth.top[i][1] if k % 2 == 0 else other[truth.top[i][1]] for k, i in enumerate(unsure)]
    predict = scripted_answers(server_labels)
    stand_in.on("POST", "/predict", predict)

    home = enrolled(tmp_path, publisher, stand_in)
    stand_in.serve_bundle(bundle, "m", 1)
    with Agent.create_from_options(options(home, fallback="auto", fallback_threshold=threshold)) as agent:
        wait_for(lambda: agent.handle.current is not None and agent.handle.current.version == 1, what="v1 served")
        decodes = []
        real_decode = prepare_module.decode_then
        monkeypatch.setattr(prepare_module, "decode_then", lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
        answers = [post_photo(agent.url, photo) for photo in photos]
        assert post_photo(agent.url, b"not a photo at all")[0] == 422
        monkeypatch.setattr(prepare_module, "decode_then", real_decode)
        assert [status for status, _ in answers] == [200] * len(photos)
        assert [i for i, (_, body) in enumerate(answers) if body["source"] == "server"] == unsure
        total = wait_for(lambda: (t := summed(telemetry(stand_in)))["predictions"] >= len(photos) and t,
                         what="every prediction reported")

    assert len(decodes) == len(photos) + 1, "each photo decoded once, the ones sent to the server too"
    assert len(predict.served) == len(unsure) and all(p.split("?")[0].endswith("/predict/pixels") for p in predict.served), \
        "the server got the pixels the edge model ran"
    assert total["predictions"] == len(photos) and total["errors"] == 0
    expected_classes = Counter(index for index, _, _ in truth.top)
    assert sum(total["class_counts"]) == total["predictions"]
    assert {i: n for i, n in enumerate(total["class_counts"]) if n} == dict(expected_classes)
    assert total["low_confidence"] == len(unsure) == total["fallbacks"] == total["fallback_answers"]
    assert total["disagreements"] == len(unsure) // 2, "every other unsure photo: the server named another label"
    assert total["input"].to_report() == truth.input_stats().to_report(), "the same sums as InputStats of preprocess_pixels"
    assert total["input"].images == len(photos), "the photo that failed to decode is in no statistic"


def test_a_server_that_does_not_answer_is_no_disagreement(stand_in, bundles, publisher, photos, tmp_path):  # noqa: F811
    bundle = bundles.make("m", 1)
    truth = EdgeTruth(bundle, publisher.public_key, photos[:4])
    home = enrolled(tmp_path, publisher, stand_in)
    stand_in.serve_bundle(bundle, "m", 1)  # the stand-in has no predict route: 404 to every fallback
    with Agent.create_from_options(options(home, fallback="auto", fallback_threshold=1.0)) as agent:
        wait_for(lambda: agent.handle.current is not None, what="v1 served")
        assert all(post_photo(agent.url, photo)[1]["fallback"].startswith("unavailable") for photo in photos[:4])
        total = wait_for(lambda: (t := summed(telemetry(stand_in)))["predictions"] >= 4 and t, what="the report")
    assert (total["fallbacks"], total["fallback_answers"], total["disagreements"], total["low_confidence"]) == (4, 0, 0, 4)
    assert total["input"].to_report() == truth.input_stats().to_report()


# --- kill -9 between requests: nothing lost, nothing twice --------------------------------------------------

RUNNER = r'''
import sys
from pathlib import Path
from edge_runtime.agent import Agent, AgentOptions, RetryOptions, ServeOptions, TimeoutOptions
from edge_runtime.agent.cli import _configure_logging

_configure_logging(False)
options = AgentOptions(
    home=Path(sys.argv[1]), serve=ServeOptions(port=0), poll_interval_s=0.2, push=False, fallback="never",
    fallback_threshold=float(sys.argv[2]), telemetry_period_s=0.5, retry=RetryOptions(attempts=3, base_s=0.05, max_s=0.5),
    timeouts=TimeoutOptions(request_s=5, download_s=5, stream_s=5, fallback_s=1, exchange_s=5),
)
Agent.create_from_options(options).run_forever()
'''


def _start(home: Path, threshold: float) -> subprocess.Popen:
    (home / "agent" / "run.json").unlink(missing_ok=True)
    log = open(home / "agent.log", "a")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen([sys.executable, "-c", RUNNER, str(home), repr(threshold)], env=env, cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return process


def _url(home: Path) -> str:
    def ready() -> str | None:
        try:
            url = json.loads((home / "agent" / "run.json").read_text())["url"]
            connection = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=2)
            connection.request("GET", "/healthz")
            return url if connection.getresponse().status == 200 else None
        except (OSError, ValueError, KeyError):
            return None

    return wait_for(ready, timeout=40, what=f"the agent to serve (log: {(home / 'agent.log').read_text()[-1500:]})")


def test_a_kill_between_requests_loses_no_class_count_low_confidence_or_input_statistic(
        stand_in, bundles, publisher, photos, tmp_path):  # noqa: F811
    bundle = bundles.make("m", 1)
    truth = EdgeTruth(bundle, publisher.public_key, photos)
    threshold = truth.threshold_splitting(0.4)
    home = enrolled(tmp_path, publisher, stand_in)
    stand_in.serve_bundle(bundle, "m", 1)
    bursts = [range(0, 4), range(4, 9), range(9, len(photos))]
    agent = _start(home, threshold)
    try:
        for burst in bursts:  # each burst is killed within milliseconds of its last answer
            url = _url(home)
            assert [post_photo(url, photos[i])[0] for i in burst] == [200] * len(burst)
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            agent = _start(home, threshold)
        _url(home)
        total = wait_for(lambda: (t := summed(telemetry(stand_in)))["predictions"] >= len(photos) and t, timeout=30,
                         what="every count at the stand-in")
    finally:
        agent.terminate()
        agent.wait(15)
    assert total["predictions"] == len(photos), "nothing lost, nothing counted twice"
    assert sum(total["class_counts"]) == len(photos)
    assert {i: n for i, n in enumerate(total["class_counts"]) if n} == dict(Counter(index for index, _, _ in truth.top))
    assert total["low_confidence"] == sum(score < threshold for _, _, score in truth.top)
    assert total["input"].to_report() == truth.input_stats().to_report()


# --- the journal: an older agent's lines still count, a cut line is skipped ----------------------------------


def test_journal_lines_of_an_older_agent_still_count_and_a_cut_line_is_skipped(tmp_path):
    outbox = Outbox(tmp_path / "outbox.sqlite")
    with outbox.transaction() as db:  # a period an older agent saved at its last checkpoint: no class counts
        old = {"started": 1000.0, "predictions": 2, "fallbacks": 1, "errors": 0, "histogram": [0] * 9 + [2],
               "latency_buckets": [0] * 38, "latency_sum_ms": 8.0}
        db.execute("INSERT INTO open_periods (version, data) VALUES (?, ?)", (3, json.dumps(old)))
        db.execute("INSERT INTO telemetry_meta (key, value) VALUES ('covered_epoch', 4)")
    pixels = preprocess_pixels(real_photo_path("coffee.png").read_bytes(), _spec())
    count, sums, squares = pixel_sums(pixels)
    (tmp_path / "telemetry-5.journal").write_text(
        "1001.000 3 0.910000 4.000 0 0\n"  # an older agent's line
        "1001.500 3 - 2.000 0 1\n"  # an older agent's error
        f"1002.000 3 0.420000 6.000 1 0 4 1 1 1 {count} {','.join(map(str, sums))} {','.join(map(str, squares))}\n"
        "S 1002.500 4 3 2 0.610000 0 7.500 0 1\n"  # a shadow sample of v4 beside v3
        "1003.000 3 0.880000 5.000 0 0 2 0 - 1 3072 1,2"  # cut by a power cut: no newline
    )
    recorder = TelemetryRecorder(outbox, "/v1/devices/d/telemetry", period_s=3600)
    assert recorder.close_due(force=True) == 2
    reports = {m.body["mode"]: m.body for m in outbox.peek()}
    serving, shadow = reports["serving"], reports["shadow"]
    assert (serving["version"], serving["predictions"], serving["errors"], serving["fallbacks"]) == (3, 4, 1, 2)
    assert serving["class_counts"] == [0, 0, 0, 0, 1] and serving["low_confidence"] == 1
    assert (serving["fallback_answers"], serving["disagreements"]) == (1, 1)
    expected = InputStats()
    expected.add(pixels)
    assert serving["input_stats"] == expected.to_report()
    assert (shadow["version"], shadow["shadow_of"], shadow["predictions"], shadow["agreements"]) == (4, 3, 1, 0)
    assert shadow["class_counts"] == [0, 0, 1] and shadow["low_confidence"] == 1 and shadow["fallbacks"] == 0
    outbox.close()


def test_shadow_samples_are_their_own_period_and_survive_a_kill(tmp_path):
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path)
    recorder = TelemetryRecorder(outbox, "/v1/devices/d/telemetry", period_s=3600)
    pixels = preprocess_pixels(real_photo_path("chelsea.png").read_bytes(), _spec())
    recorder.record(2, 0.8, 3.0, label_index=1, pixels=pixels)
    recorder.record_shadow(2, 1, label_index=1, score=0.7, agrees=True, latency_ms=9.0, threshold=0.6)
    recorder.checkpoint()
    recorder.record_shadow(2, 1, label_index=0, score=0.4, agrees=False, latency_ms=11.0, threshold=0.6, pixels=pixels)
    recorder.record_shadow(2, 1, label_index=None, score=None, agrees=False, latency_ms=2.0, error=True)  # a line without sums
    outbox.close()  # killed: the last two are only in the journal

    outbox = Outbox(path)
    recorder = TelemetryRecorder(outbox, "/v1/devices/d/telemetry", period_s=3600)
    assert recorder.close_due(force=True) == 2
    reports = {m.body["mode"]: m.body for m in outbox.peek()}
    serving, shadow = reports["serving"], reports["shadow"]
    assert (serving["version"], serving["predictions"], serving["class_counts"]) == (2, 1, [0, 1])
    assert "shadow_of" not in serving and "agreements" not in serving
    assert (shadow["version"], shadow["shadow_of"], shadow["predictions"], shadow["errors"]) == (2, 1, 2, 1)
    assert (shadow["agreements"], shadow["low_confidence"], shadow["class_counts"]) == (1, 1, [1, 1])
    expected = InputStats()
    expected.add(pixels)  # the one sample that carried its pixels: the candidate's input shift is measured in shadow too
    assert shadow["fallbacks"] == 0 and shadow["input_stats"] == expected.to_report()
    assert shadow["latency_ms"]["mean"] == 10.0
    outbox.close()


def test_a_period_saved_by_an_older_agent_loads_with_the_new_counts_at_zero():
    old = PeriodStats.from_json(json.dumps({"started": 5.0, "predictions": 3, "fallbacks": 0, "errors": 0,
                                            "histogram": [0] * 10, "latency_buckets": [0] * 38, "latency_sum_ms": 3.0,
                                            "from_a_newer_agent": 1}))
    report = old.report(1, now=65.0)
    assert report["predictions"] == 3 and report["class_counts"] == [] and report["low_confidence"] == 0
    assert report["mode"] == "serving" and "input_stats" not in report


def test_pixel_sums_are_exactly_what_input_stats_add():
    for name in ("rocket.jpg", "camera.png", "coffee.png"):
        pixels = preprocess_pixels(real_photo_path(name).read_bytes(), _spec())
        count, sums, squares = pixel_sums(pixels)
        stats = InputStats()
        stats.add(pixels)
        assert (count, [float(s) for s in sums], [float(q) for q in squares]) == (stats.pixels, stats.sum, stats.sum_sq)


def _spec():
    from preprocessing import PreprocessSpec

    return PreprocessSpec(height=32, width=32)


def test_the_servable_decodes_once_and_answers_as_the_classifier_does(bundles, publisher, photos):  # noqa: F811
    from edge_runtime.agent.servable import make_loader
    from edge_runtime.classifier import Classifier, ClassifierOptions

    bundle = bundles.make("m", 1)
    servable = make_loader(publisher.public_key, bundle.parent)(bundle)
    with Classifier.create_from_options(ClassifierOptions(model=bundle, public_key=publisher.public_key, top_k=3)) as classifier:
        for photo in photos[:4]:
            answer = servable.classify(photo, 3)
            categories, ms = answer  # still the (categories, milliseconds) pair older callers unpack
            assert categories == classifier.classify(photo)[0] and ms > 0
            assert (answer.pixels == preprocess_pixels(photo, classifier.spec)).all()
            assert answer.label_index == classifier.labels.index(categories[0].label)
    servable.close()


# --- against a real sync-server: the figures the operator sees come from what the agent measured ------------


def test_a_device_that_sees_its_baselines_photos_shows_no_drift_and_other_photos_shift_its_inputs(
        validated_bundle, tiny_saved_model, demo_dataset, tmp_path):
    from converter import read_bundle
    from edge_runtime.agent import enroll
    from preprocessing import list_images, mean_shift
    from tests.agent_support import sync_server_process
    from tests.server_fixtures import ENROLLMENT_SECRET

    baseline = read_bundle(validated_bundle.bundle, validated_bundle.public_key).manifest.baseline
    assert baseline is not None
    own = [Path(p).read_bytes() for p in list_images(validated_bundle.validation_photos)]
    assert baseline.images == len(own), "the device gets exactly the photos the baseline was measured on"
    others = [real_photo_path(name).read_bytes() for name in ("rocket.jpg", "chelsea.png", "coffee.png", "moon.png")]

    with sync_server_process(tmp_path / "server", [validated_bundle.public_key]) as server:
        server.publish(validated_bundle.bundle, tiny_saved_model)
        home = tmp_path / "device"
        home.mkdir()
        (home / "trusted.pub").write_bytes(validated_bundle.public_key.read_bytes())
        enroll(AgentPaths.at(home), server.url, ENROLLMENT_SECRET, model="shop", name="kiosk-baseline")

        def figures(predictions: int) -> dict:
            def ready() -> dict | None:
                versions = server.admin("GET", "/v1/models/shop/quality?mode=serving").json()["versions"]
                return versions[0] if versions and versions[0]["predictions"] >= predictions else None

            return wait_for(ready, timeout=30, what=f"{predictions} predictions in the quality figures")

        with Agent.create_from_options(options(home)) as agent:  # the bundle's own threshold
            wait_for(lambda: agent.handle.current is not None, timeout=30, what="v1 served")
            assert [post_photo(agent.url, photo)[0] for photo in own] == [200] * len(own)
            same = figures(len(own))
            assert same["predictions"] == len(own) and same["devices"] == 1
            assert same["class_jsd"] == pytest.approx(0.0, abs=1e-9), "the same answers as the validation run"
            assert same["confidence_jsd"] == pytest.approx(0.0, abs=1e-9)
            assert same["low_confidence_rate"] == pytest.approx(baseline.low_confidence_rate, abs=1e-6)
            assert same["input_shift"] == pytest.approx(0.0, abs=1e-3), "the same pixels as the baseline's"

            assert [post_photo(agent.url, photo)[0] for photo in others] == [200] * len(others)
            shifted = figures(len(own) + len(others))
        spec = read_bundle(validated_bundle.bundle, validated_bundle.public_key).spec
        seen = InputStats()
        for photo in own + others:
            seen.add(preprocess_pixels(photo, spec))
        expected = mean_shift(seen, list(baseline.input.mean), list(baseline.input.std))
        assert expected > 0.01
        assert shifted["input_shift"] == pytest.approx(expected, rel=1e-3), "the shift of what the device saw"
