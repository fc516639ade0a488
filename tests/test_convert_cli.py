"""A release engineer's session with `edge-convert`: make a key, convert and publish, inspect the bundle."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

from converter.cli import main  # noqa: E402


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def session(tiny_saved_model, demo_dataset, tmp_path_factory):
    """keygen, then one conversion (the default command, --json, --serving-repo), shared by the tests."""
    root = tmp_path_factory.mktemp("release")
    key = root / "release.key"
    assert main(["keygen", "--out", str(key)]) == 0
    repo = root / "serving"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([
            str(tiny_saved_model), "--out", str(root / "bundle"), "--quantize", "dynamic",
            "--validation", str(demo_dataset / "val"), "--min-agreement", "0.75", "--min-class-agreement", "0",
            "--sign-key", str(key), "--name", "tiny", "--serving-repo", str(repo), "--json",
        ])
    return {"root": root, "key": key, "repo": repo, "code": code, "report": json.loads(stdout.getvalue())}


def test_keygen_writes_a_private_and_a_public_key(tmp_path, capsys):
    code, out, _ = run(capsys, "keygen", "--out", tmp_path / "k")
    assert code == 0
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert "-----BEGIN PUBLIC KEY-----" in (tmp_path / "k.pub").read_text()
    assert "key id " in out
    code, _, err = run(capsys, "keygen", "--out", tmp_path / "k")
    assert code == 2 and "already exists" in err


@pytest.mark.slow
def test_convert_is_the_default_command_and_reports_json(session):
    report = session["report"]
    assert session["code"] == 0 and report["ok"] is True
    assert report["quantization"] == "dynamic" and report["name"] == "tiny" and report["version"] == 1
    assert report["validation"]["passed"] is True
    assert {"agreement", "mean_abs_diff", "per_class", "size_ratio", "saved_model", "tflite"} <= set(
        report["validation"])
    assert report["signing"]["algorithm"] == "Ed25519"
    assert Path(report["bundle"]).is_dir()


@pytest.mark.slow
def test_the_serving_repository_gets_the_same_version(session, tiny_saved_model):
    version = session["repo"] / "tiny" / "1"
    assert (version / "saved_model.pb").is_file() and (version / "variables").is_dir()
    assert session["report"]["serving_path"] == str(version)
    manifest = json.loads((Path(session["report"]["bundle"]) / "manifest.json").read_text())
    assert {k: manifest["serving"][k] for k in ("name", "version")} == {"name": "tiny", "version": 1}
    assert manifest["serving"]["warmup"]["file"] == "assets.extra/tf_serving_warmup_requests"
    assert (version / manifest["serving"]["warmup"]["file"]).is_file()  # tests/test_serving_warmup.py reads it
    assert [p.name for p in (session["repo"] / "tiny").iterdir()] == ["1"]  # no half-copied folders


@pytest.mark.slow
def test_serving_export_adds_the_next_version_and_never_overwrites(session, tiny_saved_model, capsys):
    repo = session["repo"]
    code, out, _ = run(capsys, "serving-export", tiny_saved_model, "--repo", repo, "--name", "tiny")
    assert code == 0 and out.strip().endswith(str(repo / "tiny" / "2"))
    code, _, err = run(capsys, "serving-export", tiny_saved_model, "--repo", repo, "--name", "tiny",
                       "--version", "1")
    assert code == 2 and "versions are immutable, publish version 3" in err


@pytest.mark.slow
def test_inspect_verifies_and_summarises_a_bundle(session, capsys):
    bundle = session["report"]["bundle"]
    code, out, err = run(capsys, "inspect", bundle, "--public-key", f"{session['key']}.pub")
    assert code == 0, err
    assert "signature verified (key " in out
    assert "metadata  ok" in out and "smoke     passed (" in out
    code, out, _ = run(capsys, "inspect", bundle, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] and doc["checks"]["signature"] == "not_checked"
    assert doc["manifest"]["name"] == "tiny"


@pytest.mark.slow
def test_inspect_refuses_a_tampered_bundle(session, tmp_path, capsys):
    import shutil

    copy = Path(shutil.copytree(session["report"]["bundle"], tmp_path / "copy"))
    model = copy / "model.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    code, _, err = run(capsys, "inspect", copy, "--public-key", f"{session['key']}.pub")
    assert code == 2 and "does not match the sha256 in the manifest" in err
    (copy / "manifest.sig").unlink()
    code, _, err = run(capsys, "inspect", copy, "--public-key", f"{session['key']}.pub")
    assert code == 2 and "unsigned" in err


def test_help_and_unknown_options(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "edge-convert" in err
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "keygen" in out and "serving-export" in out
    code, _, err = run(capsys, "model", "--out", "b", "--quantize", "int4")
    assert code == 2 and "invalid choice: 'int4'" in err
