"""A seller's kiosk classifies photos with `edge-classify`: fast, offline, asking the server when unsure."""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.cli import main
from tests.conftest import encode, real_photo_path


@pytest.fixture(scope="module")
def publisher(tmp_path_factory):
    """The publisher's signing key pair (private PEM, public PEM)."""
    from converter.signing import write_keypair

    private, public = write_keypair(tmp_path_factory.mktemp("keys") / "publisher")
    return private, public


@pytest.fixture(scope="module")
def int8_bundle(tiny_saved_model, demo_dataset, publisher, tmp_path_factory):
    """The tiny demo model as a signed full-int8 bundle (the format a kiosk runs)."""
    from converter.options import ConvertOptions, QuantizationOptions, SigningOptions, ValidationOptions
    from converter.pipeline import convert

    out = tmp_path_factory.mktemp("bundles") / "int8"
    convert(
        tiny_saved_model,
        ConvertOptions(
            out=out,
            name="shop",
            version=1,
            quantization=QuantizationOptions(mode="int8", calibration=demo_dataset / "train"),
            validation=ValidationOptions(skip=True),
            signing=SigningOptions(key=publisher[0]),
        ),
    )
    return out


@pytest.fixture
def device(tmp_path, monkeypatch, publisher):
    """A device: its own model store, the publisher's key pinned, no server configured."""
    home = tmp_path / "device"
    home.mkdir()
    shutil.copy(publisher[1], home / "trusted.pub")
    monkeypatch.setenv("EDGE_CLASSIFY_HOME", str(home))
    monkeypatch.delenv("EDGE_CLASSIFY_SERVER", raising=False)
    monkeypatch.delenv("EDGE_CLASSIFY_PUBLIC_KEY", raising=False)
    return home


@pytest.fixture(scope="module")
def photos(tmp_path_factory, demo_dataset, chelsea):
    """A folder with good photos of each kind and bad ones: a text file named .jpg, a cut-off JPEG."""
    folder = tmp_path_factory.mktemp("photos")
    for i, path in enumerate(sorted((demo_dataset / "test").rglob("*.jpg"))[:4]):
        shutil.copy(path, folder / f"good_{i}.jpg")
    (folder / "good_png.png").write_bytes(encode(chelsea, "PNG"))
    (folder / "bad_text.jpg").write_text("not a photo")
    jpeg = encode(chelsea, "JPEG")
    (folder / "bad_cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "notes.txt").write_text("ignored: not a photo file name")
    return folder


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- one photo, a folder, exit statuses ----------------------------------------------------------


def test_a_good_photo_gets_its_top_categories(device, int8_bundle, capsys):
    code, out, err = run(capsys, real_photo_path("rocket.jpg"), "--model", int8_bundle, "--top-k", "2")
    assert code == 0, err
    line = out.strip()
    assert line.startswith(str(real_photo_path("rocket.jpg")) + ": ")
    assert "(edge, " in line and line.endswith(" ms)")
    labels = (int8_bundle / "labels.txt").read_text().split()
    assert sum(label in line for label in labels) == 2


def test_json_lines_carry_every_field(device, int8_bundle, capsys):
    code, out, _ = run(capsys, real_photo_path("rocket.jpg"), "--model", int8_bundle, "--json", "--top-k", "3",
                       "--fallback", "never")
    assert code == 0
    [result] = json_lines(out)
    assert set(result) >= {"path", "label", "score", "top_k", "model", "source", "latency_ms", "error"}
    assert result["model"] == {"name": "shop", "version": 1}
    assert result["source"] == "edge" and result["error"] is None
    assert len(result["top_k"]) == 3 and result["top_k"][0]["label"] == result["label"]
    scores = [c["score"] for c in result["top_k"]]
    assert scores == sorted(scores, reverse=True) and 0 <= scores[-1] <= scores[0] <= 1
    assert result["latency_ms"] > 0


def test_a_folder_with_good_and_bad_photos_reports_each_and_exits_1(device, int8_bundle, photos, capsys):
    code, out, _ = run(capsys, photos, "--model", int8_bundle, "--json", "--fallback", "never")
    assert code == 1
    results = {Path(r["path"]).name: r for r in json_lines(out)}
    assert set(results) == {"good_0.jpg", "good_1.jpg", "good_2.jpg", "good_3.jpg", "good_png.png",
                            "bad_text.jpg", "bad_cut.jpg"}
    assert results["bad_text.jpg"]["error"]["code"] == "not_an_image"
    assert results["bad_cut.jpg"]["error"]["code"] == "truncated"
    assert results["bad_cut.jpg"]["label"] is None
    for name in ("good_0.jpg", "good_png.png"):
        assert results[name]["error"] is None and results[name]["label"]
    assert [Path(r["path"]).name for r in json_lines(out)] == sorted(results)  # input order


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory, demo_dataset) -> Path:
    """A long run: 24 good photos, with a cut-off one in the middle."""
    folder = tmp_path_factory.mktemp("many")
    for i, path in enumerate(sorted((demo_dataset / "test").rglob("*.jpg"))[:24]):
        shutil.copy(path, folder / f"photo_{i:02d}.jpg")
    data = (folder / "photo_05.jpg").read_bytes()
    (folder / "photo_05.jpg").write_bytes(data[: len(data) // 3])
    return folder


def test_a_folder_is_prepared_on_workers_and_run_in_batches_with_the_same_answers(int8_bundle, publisher,
                                                                                  many_photos, monkeypatch):
    from edge_runtime.classifier import Classifier, ClassifierOptions
    from edge_runtime.pipeline import PipelineOptions, classify_paths

    paths = sorted(many_photos.iterdir())
    with Classifier.create_from_options(ClassifierOptions(model=int8_bundle, public_key=publisher[1])) as classifier:
        assert classifier.max_batch > 1, "the demo model takes a variable batch"
        one_by_one = {}
        for path in paths:
            if path.name != "photo_05.jpg":
                one_by_one[str(path)] = classifier.classify(path)[0]

        batches, threads = [], set()
        run_batch, prepare = classifier.run_batch, classifier.prepare

        def spy_run_batch(batch):
            batches.append(len(batch))
            return run_batch(batch)

        import edge_runtime.pipeline as pipeline

        load = pipeline._load

        def spy_load(*args, **kwargs):
            threads.add(threading.current_thread().name)
            return load(*args, **kwargs)

        monkeypatch.setattr(classifier, "run_batch", spy_run_batch)
        monkeypatch.setattr(pipeline, "_load", spy_load)
        results = list(classify_paths(paths, classifier, PipelineOptions(workers=2, fallback="never")))

    assert [r.path for r in results] == [str(p) for p in paths], "answers come back in input order"
    assert max(batches) > 1 and sum(batches) == len(paths) - 1, batches
    assert threads and all(name.startswith("edge-decode") for name in threads), "decoded off the main thread"
    for result in results:
        if result.path.endswith("photo_05.jpg"):
            assert result.error["code"] == "truncated" and result.categories == ()
        else:
            assert result.error is None
            assert [c.label for c in result.categories] == [c.label for c in one_by_one[result.path]]
            for got, alone in zip(result.categories, one_by_one[result.path]):
                assert got.score == pytest.approx(alone.score, abs=1e-6), "a batch answers like single photos"


def _run_in_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `edge-classify` with its stderr on a pseudo-terminal; returns the exit status and what it showed."""
    import os
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", *args], stdout=subprocess.DEVNULL,
                               stderr=follower, env=env)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process is gone
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return process.wait(timeout=60), shown.decode(errors="replace")


def test_a_long_run_on_a_terminal_shows_progress_and_a_pipe_gets_none(device, int8_bundle, many_photos):
    import os

    env = {**os.environ, "EDGE_CLASSIFY_HOME": str(device), "EDGE_CLASSIFY_PUBLIC_KEY": str(device / "trusted.pub")}
    args = [str(many_photos), "--model", str(int8_bundle), "--fallback", "never"]
    code, shown = _run_in_a_terminal(args, env)
    assert code == 1, shown  # the cut-off photo
    assert "\r10/24 photos" in shown and "\r24/24 photos" in shown, shown

    piped = subprocess.run([sys.executable, "-m", "edge_runtime.cli", *args], capture_output=True, env=env, text=True)
    assert piped.returncode == 1 and "photos" not in piped.stderr and len(piped.stdout.splitlines()) == 24


def test_a_missing_photo_is_a_bad_input_not_a_crash(device, int8_bundle, tmp_path, capsys):
    code, out, _ = run(capsys, tmp_path / "nope.jpg", "--model", int8_bundle)
    assert code == 1
    assert "error not_found" in out


def test_usage_errors_exit_2_with_one_line(device, capsys):
    code, _, err = run(capsys)
    assert code == 2 and "give at least one photo" in err
    code, _, err = run(capsys, "photo.jpg", "--top-k", "0")
    assert code == 2 and "--top-k must be at least 1" in err
    code, _, err = run(capsys, "photo.jpg", "--delegate", "tpu")
    assert code == 2 and "invalid choice" in err


def test_threads_reach_the_interpreter_and_do_not_change_the_answer(device, int8_bundle, capsys):
    answers = []
    for threads in ("1", "3"):
        code, out, err = run(capsys, real_photo_path("rocket.jpg"), "--model", int8_bundle, "--threads", threads,
                             "--json", "--verbose")
        assert code == 0 and f'"threads": {threads}' in err
        answers.append(json_lines(out)[0]["top_k"])
    assert answers[0] == answers[1]
    code, _, err = run(capsys, real_photo_path("rocket.jpg"), "--threads", "0")
    assert code == 2 and "threads must be at least 1" in err


def test_no_model_anywhere_says_how_to_get_one(device, capsys):
    code, _, err = run(capsys, real_photo_path("rocket.jpg"))
    assert code == 2
    assert "no model is installed" in err and "edge-classify models install" in err
    assert "Traceback" not in err


def test_version_names_the_interpreter_backend(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and "interpreter: ai-edge-litert" in out


# --- verification ------------------------------------------------------------------------------


def test_a_model_file_changed_after_signing_is_refused(device, int8_bundle, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    shutil.copytree(int8_bundle, tampered)
    model = bytearray((tampered / "model.tflite").read_bytes())
    model[-100] ^= 0xFF
    (tampered / "model.tflite").write_bytes(bytes(model))
    code, _, err = run(capsys, real_photo_path("rocket.jpg"), "--model", tampered)
    assert code == 2 and "sha256" in err


def test_a_bundle_signed_by_another_key_is_refused(device, int8_bundle, tmp_path, capsys):
    from converter.signing import write_keypair

    _, stranger = write_keypair(tmp_path / "stranger")
    code, _, err = run(capsys, real_photo_path("rocket.jpg"), "--model", int8_bundle, "--public-key", stranger)
    assert code == 2 and "does not verify" in err


def test_an_unsigned_bundle_is_refused(device, int8_bundle, tmp_path, capsys):
    unsigned = tmp_path / "unsigned"
    shutil.copytree(int8_bundle, unsigned)
    (unsigned / "manifest.sig").unlink()
    code, _, err = run(capsys, real_photo_path("rocket.jpg"), "--model", unsigned)
    assert code == 2 and "unsigned" in err


def test_a_device_that_trusts_the_next_key_too_loads_bundles_signed_with_it(device, int8_bundle, tmp_path, capsys):
    from converter.bundle import read_bundle, write_bundle
    from converter.signing import write_keypair

    next_private, next_public = write_keypair(tmp_path / "next")
    original = read_bundle(int8_bundle, device / "trusted.pub")
    resigned = write_bundle(tmp_path / "resigned", (int8_bundle / "model.tflite").read_bytes(), original.manifest,
                            sign_key=next_private)
    photo = real_photo_path("rocket.jpg")
    assert run(capsys, photo, "--model", resigned)[0] == 2  # signed by a key the device does not trust yet

    ring = device / "trusted.pub"
    ring.write_bytes(ring.read_bytes() + next_public.read_bytes())
    for bundle in (int8_bundle, resigned):  # the current key and the next one
        code, out, _ = run(capsys, photo, "--model", bundle, "--json")
        assert code == 0 and json_lines(out)[0]["label"]


def test_without_a_pinned_key_nothing_loads(device, int8_bundle, capsys):
    (device / "trusted.pub").unlink()
    code, _, err = run(capsys, real_photo_path("rocket.jpg"), "--model", int8_bundle)
    assert code == 2 and "no trusted publisher key" in err


# --- the local model store -----------------------------------------------------------------------


def test_install_use_rollback_through_the_cli(device, int8_bundle, tmp_path, publisher, capsys):
    from converter.bundle import read_bundle, write_bundle
    from dataclasses import replace

    # Version 2: the same model re-signed under a new version number.
    v1 = read_bundle(int8_bundle, publisher[1])
    v2_dir = tmp_path / "v2"
    write_bundle(v2_dir, v1.read_model(), replace(v1.manifest, version=2), sign_key=publisher[0])

    assert run(capsys, "models", "install", int8_bundle, "--use")[0] == 0
    assert run(capsys, "models", "install", v2_dir)[0] == 0
    code, out, _ = run(capsys, "models", "list")
    assert out.splitlines() == ["shop  v1  current", "shop  v2"]

    assert run(capsys, "models", "use", "2")[0] == 0
    code, out, _ = run(capsys, real_photo_path("rocket.jpg"), "--json")  # the store's current model
    assert code == 0 and json_lines(out)[0]["model"] == {"name": "shop", "version": 2}

    code, out, _ = run(capsys, "models", "rollback")
    assert code == 0 and "now using shop v1" in out
    code, out, _ = run(capsys, real_photo_path("rocket.jpg"), "--json")
    assert json_lines(out)[0]["model"]["version"] == 1
    code, out, _ = run(capsys, "models", "path")
    assert out.strip() == str(device)


def test_installing_a_tampered_bundle_leaves_the_store_untouched(device, int8_bundle, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    shutil.copytree(int8_bundle, tampered)
    (tampered / "labels.txt").write_text("a\nb\nc\nd\ne\nf\n")
    code, _, err = run(capsys, "models", "install", tampered)
    assert code == 2 and "refused" in err
    assert run(capsys, "models", "list")[1].startswith("no models installed")


# --- server fallback ---------------------------------------------------------------------------


class _StandIn(http.server.BaseHTTPRequestHandler):
    """The sync server's prediction endpoint, as the device sees it."""

    delay_s = 0.0
    requests: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).requests.append((self.path, self.headers.get("Authorization"), len(body)))
        time.sleep(self.delay_s)
        answer = {"model": {"name": "shop", "version": 1},
                  "top_k": [{"label": "sneaker", "score": 0.97}, {"label": "mug", "score": 0.02}]}
        data = json.dumps(answer).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _StandIn.delay_s, _StandIn.requests = 0.0, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _StandIn
    httpd.shutdown()
    httpd.server_close()


def test_an_unsure_photo_is_answered_by_the_server(device, int8_bundle, server, capsys, monkeypatch):
    url, standin = server
    monkeypatch.setenv("EDGE_CLASSIFY_TOKEN", "device-token")
    code, out, _ = run(capsys, real_photo_path("rocket.jpg"), "--model", int8_bundle, "--json",
                       "--server", url, "--threshold", "1.0")
    assert code == 0
    [result] = json_lines(out)
    assert result["source"] == "server" and result["label"] == "sneaker" and result["fallback"] == "answered"
    [(path, auth, size)] = standin.requests
    assert path.startswith("/v1/models/shop/predict/pixels?") and "version=1" in path
    assert auth == "Bearer device-token"
    from tests.model_fixtures import TINY_INPUT

    assert size == TINY_INPUT[0] * TINY_INPUT[1] * 3  # the fitted pixels the device ran, not the photo


def test_a_confident_photo_never_leaves_the_device(device, int8_bundle, server, capsys):
    url, standin = server
    code, out, _ = run(capsys, real_photo_path("rocket.jpg"), "--model", int8_bundle, "--json",
                       "--server", url, "--threshold", "0.0")
    assert code == 0 and json_lines(out)[0]["source"] == "edge" and standin.requests == []


def test_a_slow_server_is_abandoned_after_the_timeout(device, int8_bundle, server, capsys):
    url, standin = server
    standin.delay_s = 3.0
    started = time.perf_counter()
    code, out, _ = run(capsys, real_photo_path("rocket.jpg"), "--model", int8_bundle, "--json",
                       "--server", url, "--threshold", "1.0", "--timeout", "0.5")
    elapsed = time.perf_counter() - started
    assert code == 0
    result = json_lines(out)[0]
    assert result["source"] == "edge" and result["label"]
    assert result["fallback"].startswith("unavailable") and "0.5 s" in result["fallback"]
    assert elapsed < 2.5  # bounded by the timeout, not by the server


def test_offline_keeps_the_edge_answer_and_says_so(device, int8_bundle, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    code, out, _ = run(capsys, real_photo_path("rocket.jpg"), "--model", int8_bundle,
                       "--server", f"http://127.0.0.1:{port}", "--threshold", "1.0")
    assert code == 0
    assert "(edge; server unavailable: the server is unreachable" in out


def test_always_mode_without_a_server_still_answers_on_the_edge(device, int8_bundle, capsys):
    code, out, _ = run(capsys, real_photo_path("rocket.jpg"), "--model", int8_bundle, "--json", "--fallback", "always")
    result = json_lines(out)[0]
    assert code == 0 and result["source"] == "edge" and "no server configured" in result["fallback"]


# --- start-up -------------------------------------------------------------------------------------


def test_the_command_imports_no_tensorflow(device, int8_bundle):
    script = (
        "import sys; from edge_runtime.cli import main; "
        f"code = main([{str(real_photo_path('rocket.jpg'))!r}, '--model', {str(int8_bundle)!r}, '--json']); "
        "heavy = [m for m in ('tensorflow', 'tf_keras', 'keras', 'fastapi') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(code)"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                               env={**__import__('os').environ, "EDGE_CLASSIFY_HOME": str(device)})
    assert completed.returncode == 0, completed.stderr
    assert "HEAVY []" in completed.stdout


def test_one_photo_loads_only_what_it_needs(device, int8_bundle, publisher):
    # A kiosk's cold start: no worker pool, no model store, no PEM/SSH key parsers, no converter
    # options, and Pillow's JPEG plugin alone.
    script = (
        "import sys; from edge_runtime.cli import main; "
        f"code = main([{str(real_photo_path('rocket.jpg'))!r}, '--model', {str(int8_bundle)!r}, "
        f"'--public-key', {str(publisher[1])!r}, '--json', '--fallback', 'never']); "
        "loaded = [m for m in ('concurrent.futures', 'edge_runtime.store', 'edge_runtime.fallback', "
        "'cryptography.hazmat.primitives.serialization', 'converter.options', 'PIL.PngImagePlugin') "
        "if m in sys.modules]; "
        "print('LOADED', loaded); sys.exit(code)"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                               env={**__import__('os').environ, "EDGE_CLASSIFY_HOME": str(device)})
    assert completed.returncode == 0, completed.stderr
    assert "LOADED []" in completed.stdout


def test_only_the_command_itself_skips_the_collection_at_exit(device, capsys):
    import gc

    frozen = gc.get_freeze_count()
    assert run(capsys, "--top-k", "0")[0] == 2  # in-process: nothing frozen
    assert gc.get_freeze_count() == frozen
    script = ("import gc, sys; sys.argv = ['edge-classify', '--top-k', '0']; from edge_runtime.cli import main; "
              "code = main(); print('FROZEN', gc.get_freeze_count() > 0); sys.exit(code)")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and "FROZEN True" in completed.stdout


def _bad_exif_jpeg(path: Path) -> Path:
    """A JPEG whose EXIF names data past its end: Pillow warns while decoding it."""
    import io
    import struct

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "JPEG")
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x010E, 2, 400, 2000) + b"\x00" * 4
    exif = b"Exif\x00\x00" + tiff
    jpeg = buffer.getvalue()
    path.write_bytes(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + jpeg[2:])
    return path


def test_warnings_from_an_early_decode_show_only_when_the_bundle_verifies(device, int8_bundle, tmp_path, capsys):
    import warnings

    from preprocessing import load_image

    photo = _bad_exif_jpeg(tmp_path / "bad_exif.jpg")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_image(photo)
    if not seen:
        pytest.skip("this Pillow decodes the damaged EXIF without a warning")
    code, out, err = run(capsys, photo, "--model", int8_bundle, "--json")
    assert code == 0 and json_lines(out)[0]["label"]
    assert [line for line in err.splitlines() if "warning:" in line] == [
        f"edge-classify: warning: {w.message}" for w in seen]
    tampered = tmp_path / "tampered"
    shutil.copytree(int8_bundle, tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["confidence_threshold"] = 0.01
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = run(capsys, photo, "--model", tampered, "--json")
    assert code == 2 and out == ""
    assert err.splitlines() == [err.splitlines()[0]] and "does not verify" in err  # the refusal alone


def test_an_early_decode_is_used_only_with_the_verified_spec(device, int8_bundle, publisher, tmp_path):
    from edge_runtime.bundles import peek_spec
    from edge_runtime.classifier import Classifier, ClassifierOptions
    from edge_runtime.pipeline import EarlyStart, PipelineOptions, classify_paths

    photo = tmp_path / "photo.jpg"
    shutil.copy(real_photo_path("rocket.jpg"), photo)
    options = PipelineOptions(fallback="never")
    with Classifier.create_from_options(ClassifierOptions(model=int8_bundle, public_key=publisher[1])) as classifier:
        assert peek_spec(int8_bundle) == peek_spec(int8_bundle / "model.tflite") == classifier.spec
        expected = list(classify_paths([photo], classifier, options))
        same = EarlyStart([photo], classifier.spec, keep_bytes=False)
        other = EarlyStart([photo], classifier.spec.replace(resize="nearest"), keep_bytes=False)
        same.close()
        other.close()
        photo.unlink()  # from here on, only the early work can classify it
        [early] = classify_paths([photo], classifier, options, early=same)
        assert early.categories == expected[0].categories and early.error is None
        [redone] = classify_paths([photo], classifier, options, early=other)
        assert redone.error["code"] == "not_found"


def test_peek_spec_never_raises(int8_bundle, tmp_path):
    from converter.bundle import MANIFEST_FILE
    from edge_runtime import bundles

    assert bundles._MANIFEST_FILE == MANIFEST_FILE
    assert bundles.peek_spec(tmp_path / "missing") is None
    (tmp_path / MANIFEST_FILE).write_text('{"preprocess_spec": {"height": -1}}')
    assert bundles.peek_spec(tmp_path) is None
    (tmp_path / MANIFEST_FILE).write_text("not json")
    assert bundles.peek_spec(tmp_path) is None


# --- interpreters and delegates ------------------------------------------------------------------


def test_a_missing_gpu_delegate_falls_back_to_the_cpu_with_one_warning(device, int8_bundle, tmp_path, capsys):
    code, out, err = run(capsys, real_photo_path("rocket.jpg"), "--model", int8_bundle, "--delegate", "gpu",
                         "--gpu-delegate", tmp_path / "libtensorflowlite_gpu_delegate.so", "--json", "--verbose")
    assert code == 0 and json_lines(out)[0]["label"]
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "GPU delegate unavailable" in warnings[0] and "running on the CPU" in warnings[0]
    assert "could not be loaded" in warnings[0]
    assert '"delegate": "cpu"' in err


@pytest.fixture(scope="module")
def rejecting_delegate(tmp_path_factory) -> Path:
    """A real delegate library, built from tests/rejecting_delegate.c, that loads and then refuses the
    model the way the GPU delegate refuses ops it cannot run."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the stand-in delegate")
    library = tmp_path_factory.mktemp("delegate") / "librejecting_delegate.so"
    source = Path(__file__).with_name("rejecting_delegate.c")
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(library), str(source)], check=True)
    return library


def test_a_gpu_delegate_that_rejects_the_model_falls_back_to_the_cpu(device, int8_bundle, rejecting_delegate,
                                                                    capsys):
    code, out, err = run(capsys, real_photo_path("rocket.jpg"), "--model", int8_bundle, "--delegate", "gpu",
                         "--gpu-delegate", rejecting_delegate, "--json", "--verbose")
    assert code == 0
    answer = json_lines(out)[0]
    assert answer["error"] is None and answer["source"] == "edge" and answer["label"]
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "GPU delegate unavailable" in warnings[0] and "running on the CPU" in warnings[0]
    assert "rejected the model" in warnings[0]
    assert '"delegate": "cpu"' in err


@pytest.fixture(scope="module")
def float16_bundle(tiny_saved_model, publisher, tmp_path_factory):
    """The tiny demo model as a float16 bundle: the GPU delegate's format."""
    from converter.options import ConvertOptions, QuantizationOptions, SigningOptions, ValidationOptions
    from converter.pipeline import convert

    out = tmp_path_factory.mktemp("bundles") / "float16"
    convert(tiny_saved_model, ConvertOptions(out=out, name="shop", version=2, target="gpu",
                                             quantization=QuantizationOptions(mode="float16"),
                                             validation=ValidationOptions(skip=True),
                                             signing=SigningOptions(key=publisher[0])))
    return out


def test_auto_tries_the_gpu_only_for_a_float16_bundle(device, int8_bundle, float16_bundle, rejecting_delegate,
                                                      capsys, monkeypatch):
    monkeypatch.setenv("EDGE_CLASSIFY_GPU_DELEGATE", str(rejecting_delegate))
    photo = real_photo_path("rocket.jpg")
    code, out, err = run(capsys, photo, "--model", int8_bundle, "--json", "--verbose")
    assert code == 0 and json_lines(out)[0]["label"]
    assert "warning:" not in err and '"delegate": "cpu"' in err, "an int8 bundle never tries the GPU"

    code, out, err = run(capsys, photo, "--model", float16_bundle, "--json", "--verbose")
    assert code == 0 and json_lines(out)[0]["label"]
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "rejected the model" in warnings[0], err
    assert '"delegate": "cpu"' in err

    monkeypatch.delenv("EDGE_CLASSIFY_GPU_DELEGATE")
    code, _, err = run(capsys, photo, "--model", float16_bundle, "--json")
    assert code == 0 and "warning:" not in err, "auto without a library stays quietly on the CPU"


def test_the_gpu_without_a_library_says_how_to_give_one(device, int8_bundle, capsys, monkeypatch):
    monkeypatch.delenv("EDGE_CLASSIFY_GPU_DELEGATE", raising=False)
    code, _, err = run(capsys, real_photo_path("rocket.jpg"), "--model", int8_bundle, "--delegate", "gpu")
    assert code == 0 and "EDGE_CLASSIFY_GPU_DELEGATE" in err


def test_tensorflow_lite_is_the_last_resort_backend_and_agrees_with_litert(int8_bundle, publisher):
    from edge_runtime.classifier import Classifier, ClassifierOptions

    answers = {}
    for backend in ("ai-edge-litert", "tensorflow.lite"):
        options = ClassifierOptions(model=int8_bundle, public_key=publisher[1], backend=backend)
        with Classifier.create_from_options(options) as classifier:
            assert classifier.backend.name == backend
            answers[backend] = [c.label for c in classifier.classify(real_photo_path("rocket.jpg"))[0]]
    assert answers["ai-edge-litert"] == answers["tensorflow.lite"]


def test_an_unknown_or_missing_backend_is_a_clear_error(int8_bundle, publisher):
    from edge_runtime.backends import find_backend
    from edge_runtime.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="unknown interpreter backend 'onnx'"):
        find_backend("onnx")
    try:
        import tflite_runtime  # noqa: F401
    except ImportError:
        with pytest.raises(ModelLoadError, match="no TFLite interpreter is installed.*tflite-runtime"):
            find_backend("tflite-runtime")


def test_a_classifying_process_keeps_freed_memory_for_the_next_photo():
    # glibc would hand each photo's buffers back to the kernel and fault them in again; the runtime
    # raises its thresholds once per process (a no-op answer off glibc Linux).
    from edge_runtime._memory import keep_freed_memory

    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent


def test_a_tampered_manifest_cannot_make_the_early_decode_allocate_much(int8_bundle, tmp_path):
    # The early decode reads the spec before the signature is checked: a huge input size in an altered
    # manifest must not make it prepare an 8192x8192 tensor first.
    from edge_runtime.classifier import ClassifierOptions
    from edge_runtime.cli import _early_start

    tampered = tmp_path / "tampered"
    shutil.copytree(int8_bundle, tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["preprocess_spec"].update(height=8192, width=8192)
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    photo = str(real_photo_path("rocket.jpg"))
    options = ClassifierOptions(model=tampered, public_key=tmp_path / "any.pub")
    assert _early_start([photo], options, keep_bytes=False) is None
    honest = _early_start([photo], ClassifierOptions(model=int8_bundle, public_key=tmp_path / "any.pub"), keep_bytes=False)
    assert honest is not None
    honest.close()


# --- a damaged store: the intact previous version answers, with one warning ---------------------------


def _two_versions(capsys, int8_bundle, tmp_path, publisher):
    from dataclasses import replace

    from converter.bundle import read_bundle, write_bundle

    v1 = read_bundle(int8_bundle, publisher[1])
    write_bundle(tmp_path / "v2", v1.read_model(), replace(v1.manifest, version=2), sign_key=publisher[0])
    assert run(capsys, "models", "install", int8_bundle, "--use")[0] == 0
    assert run(capsys, "models", "install", tmp_path / "v2", "--use")[0] == 0


@pytest.mark.parametrize("damage", ["truncated", "bit flipped"])
def test_a_damaged_current_model_falls_back_to_the_intact_previous_one_with_one_warning(device, int8_bundle, tmp_path, publisher,
                                                                                       capsys, damage):
    _two_versions(capsys, int8_bundle, tmp_path, publisher)
    model = device / "models" / "shop" / "2" / "model.tflite"
    data = bytearray(model.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2:]
    else:
        data[len(data) // 3] ^= 0x10
    model.write_bytes(bytes(data))
    code, out, err = run(capsys, real_photo_path("rocket.jpg"), "--json")
    assert code == 0, err
    assert json_lines(out)[0]["model"] == {"name": "shop", "version": 1}
    assert len(err.splitlines()) == 1 and err.startswith("edge-classify: warning: the current version is damaged (")
    assert "using shop v1 instead" in err and "Traceback" not in err


@pytest.mark.parametrize("pointer", [b"", b"[]", b"null", b"\x8f\x00garbage", b'{"current": {"name": "shop", "ver'])
def test_a_damaged_pointer_file_is_rebuilt_and_the_newest_intact_version_answers(device, int8_bundle, tmp_path, publisher,
                                                                                 capsys, pointer):
    _two_versions(capsys, int8_bundle, tmp_path, publisher)
    (device / "state.json").write_bytes(pointer)
    code, out, err = run(capsys, real_photo_path("rocket.jpg"), "--json")
    assert code == 0, err
    assert json_lines(out)[0]["model"] == {"name": "shop", "version": 2}
    assert len(err.splitlines()) == 1 and "was damaged" in err and "current shop v2, previous shop v1" in err
    assert json.loads((device / "state.json").read_text())["current"] == {"name": "shop", "version": 2}
    code, out, err = run(capsys, "models", "list")
    assert (code, err) == (0, "") and out.splitlines() == ["shop  v1  previous", "shop  v2  current"]
