"""A device trusts a bundle only when its files, manifest and signature agree (no TensorFlow needed)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from converter import (
    BundleFormatError,
    KeyFileError,
    Manifest,
    ModelHashMismatchError,
    PublishError,
    SignatureMismatchError,
    UnsignedBundleError,
    UsageError,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    read_bundle,
    sign,
    verify,
    write_bundle,
    write_keypair,
)
from converter.bundle import labels_text, sha256_hex
from converter.manifest import SmokeCase, SmokeTest, TensorInfo
from preprocessing import PreprocessSpec

LABELS = ("mug", "t-shirt", "sneaker")
MODEL = b"TFL3 pretend model bytes " * 40


def make_manifest(model: bytes = MODEL, labels: tuple[str, ...] = LABELS, **changes) -> Manifest:
    spec = PreprocessSpec(height=32, width=32)
    fields = dict(
        name="demo",
        version=3,
        created="2025-01-01T00:00:00Z",
        quantization="float32",
        target="cpu",
        model_file="model.tflite",
        model_sha256=sha256_hex(model),
        model_size=len(model),
        labels=labels,
        labels_file="labels.txt",
        labels_sha256=sha256_hex(labels_text(labels)),
        input=TensorInfo("image", (1, 32, 32, 3), "float32"),
        output=TensorInfo("probability", (1, len(labels)), "float32"),
        preprocess_spec=spec,
        float_preprocess_spec=spec,
        confidence_threshold=0.5,
        smoke_test=SmokeTest((SmokeCase(b"\x89PNG fake", "mug", (0.9, 0.05, 0.05), "mug.jpg"),), 0.01),
        signing=None,
    )
    fields.update(changes)
    return Manifest(**fields)


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return write_keypair(tmp_path / "signing.key")


@pytest.fixture()
def signed_bundle(tmp_path: Path, keys) -> Path:
    private, _ = keys
    return write_bundle(tmp_path / "bundle", MODEL, make_manifest(), sign_key=private)


def test_keygen_writes_a_private_key_only_its_owner_can_read(keys):
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.name == "signing.key.pub"
    assert key_id(load_private_key(private)) == key_id(load_public_key(public))


def test_keygen_never_replaces_an_existing_key(keys):
    private, _ = keys
    before = private.read_bytes()
    with pytest.raises(PublishError, match="already exists"):
        write_keypair(private)
    assert private.read_bytes() == before


def test_a_device_reads_a_signed_bundle(signed_bundle, keys):
    _, public = keys
    bundle = read_bundle(signed_bundle, public)
    assert bundle.signature == "verified"
    assert bundle.key_id == key_id(load_public_key(public))
    assert bundle.labels == LABELS
    assert bundle.read_model() == MODEL
    assert sorted(p.name for p in signed_bundle.iterdir()) == [
        "labels.txt", "manifest.json", "manifest.sig", "model.tflite"
    ]
    assert (signed_bundle / "labels.txt").read_text() == "mug\nt-shirt\nsneaker\n"


def test_the_manifest_round_trips_through_json(signed_bundle):
    manifest = Manifest.from_json((signed_bundle / "manifest.json").read_bytes())
    assert manifest == make_manifest()
    assert manifest.to_json() == (signed_bundle / "manifest.json").read_bytes()


def test_a_changed_model_file_is_refused(signed_bundle, keys):
    model = signed_bundle / "model.tflite"
    model.write_bytes(model.read_bytes()[:-1] + b"!")
    with pytest.raises(ModelHashMismatchError, match="sha256"):
        read_bundle(signed_bundle, keys[1])


def test_a_truncated_model_file_is_refused(signed_bundle, keys):
    model = signed_bundle / "model.tflite"
    model.write_bytes(model.read_bytes()[:100])
    with pytest.raises(ModelHashMismatchError, match="100 bytes but the manifest says"):
        read_bundle(signed_bundle, keys[1])


def test_a_changed_labels_file_is_refused(signed_bundle, keys):
    (signed_bundle / "labels.txt").write_text("mug\nsneaker\nt-shirt\n")
    with pytest.raises(ModelHashMismatchError, match="labels.txt"):
        read_bundle(signed_bundle, keys[1])


def test_an_edited_manifest_breaks_the_signature(signed_bundle, keys):
    path = signed_bundle / "manifest.json"
    doc = json.loads(path.read_bytes())
    doc["confidence_threshold"] = 0.01
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    with pytest.raises(SignatureMismatchError, match="does not verify"):
        read_bundle(signed_bundle, keys[1])


def test_a_bundle_signed_by_another_key_is_refused(signed_bundle, tmp_path):
    _, other = write_keypair(tmp_path / "other.key")
    with pytest.raises(SignatureMismatchError):
        read_bundle(signed_bundle, other)


def test_a_key_ring_lets_devices_trust_the_next_publisher_key_before_it_signs(signed_bundle, keys, tmp_path):
    """Rotation: devices get a trusted.pub holding the current key and the next one; bundles signed with
    either load, so the publisher can switch keys without a day on which devices refuse updates."""
    from converter.signing import key_id, load_public_key

    old_private, old_public = keys
    new_private, new_public = write_keypair(tmp_path / "next.key")
    ring = tmp_path / "trusted.pub"
    ring.write_bytes(old_public.read_bytes() + b"\n" + new_public.read_bytes())
    by_new = write_bundle(tmp_path / "by-new", MODEL, make_manifest(), sign_key=new_private)

    assert read_bundle(signed_bundle, ring).key_id == key_id(load_public_key(old_public))
    assert read_bundle(by_new, ring).key_id == key_id(load_public_key(new_public))
    with pytest.raises(SignatureMismatchError) as refused:
        read_bundle(by_new, old_public)  # a device that never got the next key
    assert key_id(load_public_key(old_public)) in str(refused.value)

    _, stranger = write_keypair(tmp_path / "stranger.key")
    with pytest.raises(SignatureMismatchError) as refused:
        read_bundle(write_bundle(tmp_path / "by-stranger", MODEL, make_manifest(), sign_key=tmp_path / "stranger.key"), ring)
    message = str(refused.value)
    assert "any of the keys" in message and key_id(load_public_key(new_public)) in message
    with pytest.raises(KeyFileError, match="holds 2 public keys where one is expected"):
        load_public_key(ring)


def test_a_garbled_signature_file_is_refused(signed_bundle, keys):
    (signed_bundle / "manifest.sig").write_bytes(b"not base64 at all!!\n")
    with pytest.raises(SignatureMismatchError, match="not base64"):
        read_bundle(signed_bundle, keys[1])


def test_devices_refuse_an_unsigned_bundle(tmp_path, keys):
    bundle = write_bundle(tmp_path / "unsigned", MODEL, make_manifest(), sign_key=None)
    assert not (bundle / "manifest.sig").exists()
    with pytest.raises(UnsignedBundleError, match="unsigned"):
        read_bundle(bundle, keys[1])
    assert read_bundle(bundle, None, require_signature=False).signature == "unsigned"


def test_reading_without_a_key_must_be_asked_for(signed_bundle):
    with pytest.raises(UsageError, match="public key"):
        read_bundle(signed_bundle, None)
    assert read_bundle(signed_bundle, None, require_signature=False).signature == "not_checked"


def test_an_unknown_manifest_format_is_refused(tmp_path, keys):
    private, public = keys
    bundle = write_bundle(tmp_path / "future", MODEL, make_manifest(format_version=2), sign_key=private)
    with pytest.raises(BundleFormatError, match="format_version 2 is not supported"):
        read_bundle(bundle, public)


def test_missing_files_and_folders_are_named(signed_bundle, keys, tmp_path):
    with pytest.raises(BundleFormatError, match="not a bundle folder"):
        read_bundle(tmp_path / "nowhere", keys[1])
    (signed_bundle / "model.tflite").unlink()
    with pytest.raises(BundleFormatError, match="no model.tflite"):
        read_bundle(signed_bundle, keys[1])


def test_a_bundle_is_never_written_half_or_over_another(tmp_path, keys, signed_bundle):
    private, _ = keys
    with pytest.raises(PublishError, match="already exists"):
        write_bundle(signed_bundle, MODEL, make_manifest(), sign_key=private)
    wrong = make_manifest(model_size=1)
    with pytest.raises(UsageError):
        write_bundle(tmp_path / "new", MODEL, wrong, sign_key=private)
    with pytest.raises(KeyFileError):
        write_bundle(tmp_path / "new", MODEL, make_manifest(), sign_key=tmp_path / "no-such-key")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "signing.key", "signing.key.pub"]


def test_overwrite_replaces_a_bundle_in_one_step(tmp_path, keys, signed_bundle):
    private, public = keys
    write_bundle(signed_bundle, MODEL, make_manifest(version=4), sign_key=private, overwrite=True)
    assert read_bundle(signed_bundle, public).manifest.version == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_signing_keys_get_one_clear_line(tmp_path, keys):
    private, public = keys
    cases = {
        tmp_path / "missing.pem": "does not exist",
        public: "is a public key",
        tmp_path / "garbage.pem": "not a PEM key file",
        tmp_path / "rsa.pem": "Ed25519",
        tmp_path / "encrypted.pem": "is encrypted",
    }
    (tmp_path / "garbage.pem").write_text("hello")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (tmp_path / "rsa.pem").write_bytes(rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ed, _ = generate_keypair()
    (tmp_path / "encrypted.pem").write_bytes(ed.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    for path, message in cases.items():
        with pytest.raises(KeyFileError, match=message) as caught:
            load_private_key(path)
        assert "\n" not in str(caught.value)
    assert isinstance(load_private_key(tmp_path / "encrypted.pem", "secret"), type(ed))
    with pytest.raises(KeyFileError, match="is a private key"):
        load_public_key(private)


def test_sign_and_verify_are_detached_signatures_over_exact_bytes(keys):
    private, public = keys
    signature = sign(b"manifest bytes", private)
    verify(b"manifest bytes", signature, public)
    with pytest.raises(SignatureMismatchError):
        verify(b"manifest bytes ", signature, public)


def test_devices_read_bundles_without_tensorflow():
    code = (
        "import sys, converter, converter.bundle, converter.signing, converter.manifest, "
        "converter.metadata, converter.smoke, converter.lite_model, converter.serving, converter.cli\n"
        "heavy = [m for m in ('tensorflow', 'tf_keras', 'keras', 'tensorflow_model_optimization') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_public_keys_load_the_same_with_or_without_the_full_pem_parser(keys, tmp_path):
    from converter.signing import _public_key_from_pem

    _, public = keys
    pem = public.read_bytes()
    quick = _public_key_from_pem(pem)
    assert quick is not None and quick == serialization.load_pem_public_key(pem)
    assert load_public_key(public) == quick and key_id(quick) == key_id(load_public_key(public))
    # CRLF line ends and a body folded differently are still the same key.
    body = b"".join(pem.splitlines()[1:-1])
    folded = b"-----BEGIN PUBLIC KEY-----\r\n" + body[:20] + b"\r\n" + body[20:] + b"\r\n-----END PUBLIC KEY-----\r\n"
    assert _public_key_from_pem(folded) == quick
    # Anything else goes to cryptography's parser, which names the problem.
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    damaged = pem.replace(pem.splitlines()[1][:8], b"AAAAAAAA")
    for other in (rsa_pem, damaged, b"Explanatory text\n" + pem, pem + pem, b"-----BEGIN PUBLIC KEY-----\n-----END"):
        assert _public_key_from_pem(other) is None
    (tmp_path / "rsa.pub").write_bytes(rsa_pem)
    with pytest.raises(KeyFileError, match="not an Ed25519 public key"):
        load_public_key(tmp_path / "rsa.pub")
    (tmp_path / "damaged.pub").write_bytes(damaged)
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_public_key(tmp_path / "damaged.pub")


def test_reading_a_bundle_loads_no_signing_or_conversion_machinery():
    # A device's cold start imports only what verifying needs: not the PEM/SSH serialization package,
    # not the converter's options, and no photo decoding just to name a spec.
    code = (
        "import sys, converter, preprocessing\n"
        "assert 'numpy' not in sys.modules and 'PIL' not in sys.modules, 'preprocessing is eager'\n"
        "from converter.bundle import read_bundle\n"
        "heavy = [m for m in ('cryptography.hazmat.primitives.serialization', 'converter.options', 'uuid', "
        "'numpy', 'PIL') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert sorted(dir(converter)) == sorted(set(dir(converter)) | set(converter.__all__))\n"
        "assert set(preprocessing.__all__) <= set(dir(preprocessing))\n"
        "assert all(getattr(preprocessing, name) is not None for name in preprocessing.__all__)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
