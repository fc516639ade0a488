"""A device keeps model versions side by side and switches between them atomically."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings

import pytest

from edge_runtime.errors import StoreError
from edge_runtime.store import ModelRef, ModelStore, default_home


def _fake_bundle(folder, marker: str):
    """A bundle's files with a manifest listing the model's size and sha256 (unsigned: the store's own
    checks need no key)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = b"TFL3" + marker.encode() * 100
    (folder / "model.tflite").write_bytes(model)
    (folder / "labels.txt").write_text("mug\nbook\n")
    manifest = {"marker": marker, "model": {"file": "model.tflite", "sha256": hashlib.sha256(model).hexdigest(), "size": len(model)},
                "labels_file": {"file": "labels.txt", "sha256": hashlib.sha256(b"mug\nbook\n").hexdigest()}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def store(tmp_path):
    return ModelStore(tmp_path / "home")


def test_the_store_lives_where_the_environment_says(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_CLASSIFY_HOME", str(tmp_path / "elsewhere"))
    assert default_home() == tmp_path / "elsewhere"
    assert ModelStore().home == tmp_path / "elsewhere"


def test_a_new_store_has_no_current_model(store):
    assert store.current() is None
    assert store.versions() == []


def test_install_use_and_rollback(store, tmp_path):
    v1, v2 = ModelRef("shop", 1), ModelRef("shop", 2)
    store.install(_fake_bundle(tmp_path / "b1", "one"), v1)
    store.install(_fake_bundle(tmp_path / "b2", "two"), v2)
    assert store.versions() == [v1, v2]
    assert store.current() is None  # installing does not switch

    store.use(v1)
    state = store.use(v2)
    assert (state.current, state.previous) == (v2, v1)
    assert store.current() == v2

    state = store.rollback()
    assert (state.current, state.previous) == (v1, v2)
    assert json.loads((store.path_of(store.current()) / "manifest.json").read_text())["marker"] == "one"


def test_a_bundle_that_fails_verification_never_enters_the_store(store, tmp_path):
    def refuse(path):
        raise StoreError("bad signature")

    with pytest.raises(StoreError, match="bad signature"):
        store.install(_fake_bundle(tmp_path / "b", "x"), ModelRef("shop", 1), verify=refuse)
    assert store.versions() == []
    assert not any(p.name.startswith(".") for p in (store.models_dir / "shop").iterdir())


def test_reinstalling_the_same_version_is_harmless_but_different_files_are_refused(store, tmp_path):
    ref = ModelRef("shop", 1)
    store.install(_fake_bundle(tmp_path / "b", "x"), ref)
    store.install(tmp_path / "b", ref)
    with pytest.raises(StoreError, match="different files"):
        store.install(_fake_bundle(tmp_path / "c", "y"), ref)


def test_using_an_uninstalled_version_names_what_is_installed(store, tmp_path):
    store.install(_fake_bundle(tmp_path / "b", "x"), ModelRef("shop", 1))
    with pytest.raises(StoreError, match=r"shop v7 is not installed \(installed: shop v1\)"):
        store.use(ModelRef("shop", 7))


def test_rollback_without_a_previous_version_is_a_clear_error(store, tmp_path):
    store.install(_fake_bundle(tmp_path / "b", "x"), ModelRef("shop", 1))
    store.use(ModelRef("shop", 1))
    with pytest.raises(StoreError, match="no previous version"):
        store.rollback()


def test_current_and_previous_cannot_be_removed_but_old_ones_are_pruned(store, tmp_path):
    refs = [ModelRef("shop", v) for v in (1, 2, 3)]
    for ref in refs:
        store.install(_fake_bundle(tmp_path / f"b{ref.version}", str(ref.version)), ref)
        store.use(ref)
    with pytest.raises(StoreError, match="in use"):
        store.remove(refs[2])
    assert store.prune() == [refs[0]]
    assert store.versions() == refs[1:]


def test_a_crash_while_switching_leaves_a_loadable_current_model(store, tmp_path, monkeypatch):
    v1, v2 = ModelRef("shop", 1), ModelRef("shop", 2)
    store.install(_fake_bundle(tmp_path / "b1", "one"), v1)
    store.install(_fake_bundle(tmp_path / "b2", "two"), v2)
    store.use(v1)

    def power_cut(*args, **kwargs):
        raise OSError("power lost")

    monkeypatch.setattr(os, "replace", power_cut)  # the rename never happens
    with pytest.raises(OSError):
        store.use(v2)
    monkeypatch.undo()
    assert store.current() == v1
    assert not [p for p in store.home.iterdir() if p.name.startswith(".state-")]


def test_a_crash_while_installing_leaves_no_half_copied_version(store, tmp_path, monkeypatch):
    import shutil

    copied = []
    real_copy = shutil.copyfile

    def copy_then_die(src, dst):
        if copied:
            raise OSError("power lost")
        copied.append(src)
        return real_copy(src, dst)

    monkeypatch.setattr(shutil, "copyfile", copy_then_die)
    with pytest.raises(OSError):
        store.install(_fake_bundle(tmp_path / "b", "x"), ModelRef("shop", 1))
    monkeypatch.undo()
    assert store.versions() == []


def test_if_the_current_folder_vanished_the_previous_version_is_loaded(store, tmp_path):
    import shutil

    v1, v2 = ModelRef("shop", 1), ModelRef("shop", 2)
    store.install(_fake_bundle(tmp_path / "b1", "one"), v1)
    store.install(_fake_bundle(tmp_path / "b2", "two"), v2)
    store.use(v1)
    store.use(v2)
    shutil.rmtree(store.path_of(v2))
    assert store.current() == v1


def test_model_names_cannot_escape_the_store(store, tmp_path):
    with pytest.raises(StoreError, match="not a usable model name"):
        store.install(_fake_bundle(tmp_path / "b", "x"), ModelRef("../etc", 1))


# --- damage is repaired, never fatal ---------------------------------------------------------------------


def _three_versions(store, tmp_path):
    refs = [ModelRef("shop", v) for v in (1, 2, 3)]
    for ref in refs:
        store.install(_fake_bundle(tmp_path / f"b{ref.version}", str(ref.version)), ref)
    store.use(refs[1])
    store.use(refs[2])
    return refs


@pytest.mark.parametrize("damage", [b"", b"\x00" * 4096, os.urandom(300), b'{"current": {"name": "shop", "vers', b"[]", b"null",
                                    b'{"current": "shop v3"}', b'{"current": {"name": "../x", "version": 1}}'])
def test_a_damaged_pointer_is_rebuilt_from_the_intact_versions_with_one_warning(store, tmp_path, damage):
    v1, v2, v3 = _three_versions(store, tmp_path)
    (store.path_of(v3) / "model.tflite").write_bytes(b"TFL3 truncated")  # the newest is damaged too
    (store.home / "state.json").write_bytes(damage)
    with pytest.warns(RuntimeWarning, match=r"pointer file .*state.json was damaged .*rebuilt it .*current shop v2, previous shop v1"):
        state = store.state()
    assert (state.current, state.previous) == (v2, v1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # written back: the next read is quiet
        assert store.state() == state
        assert store.current() == v2


def test_a_damaged_pointer_with_nothing_intact_means_no_current_model(store, tmp_path):
    v1 = ModelRef("shop", 1)
    store.install(_fake_bundle(tmp_path / "b1", "one"), v1)
    (store.path_of(v1) / "model.tflite").write_bytes(b"")
    (store.home / "state.json").write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="no intact version installed"):
        assert store.current() is None


def test_check_names_a_truncated_or_bit_flipped_model(store, tmp_path):
    v1, v2, _ = _three_versions(store, tmp_path)
    assert store.check(v1) is None
    model = store.path_of(v1) / "model.tflite"
    model.write_bytes(model.read_bytes()[:-10])
    assert store.check(v1) == f"shop v1's model.tflite has {model.stat().st_size} bytes, its manifest says {model.stat().st_size + 10}"
    model = store.path_of(v2) / "model.tflite"
    data = bytearray(model.read_bytes())
    data[50] ^= 0x01
    model.write_bytes(bytes(data))
    assert "does not match its manifest's sha256" in store.check(v2)
    (store.path_of(v2) / "manifest.json").write_bytes(b"\xff" * 10)
    assert store.check(v2) == "shop v2's manifest.json is damaged"


def test_a_damaged_current_version_can_be_discarded_and_the_previous_takes_over(store, tmp_path):
    v1, v2, v3 = _three_versions(store, tmp_path)
    state = store.discard(v3)
    assert (state.current, state.previous) == (v2, None)
    assert store.state() == state and v3 not in store.versions()
    assert store.discard(v1) == state  # neither current nor previous: just deleted
    assert store.versions() == [v2]


def test_leftovers_of_killed_work_are_removed_but_not_a_live_process_s(store, tmp_path):
    v1, _, _ = _three_versions(store, tmp_path)
    folder = store.models_dir / "shop"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    leftovers = [folder / ".7-abc123", folder / f".staging-8-{dead_pid}-x1", folder / ".trash-1", store.home / ".state-k2j3",
                 store.home / f".state-{dead_pid}-zz"]
    for path in leftovers[:3]:
        _fake_bundle(path, "half")
    for path in leftovers[3:]:
        path.write_text('{"current": ')
    alive = [folder / f".staging-9-{os.getppid()}-q", store.home / f".state-{os.getppid()}-q"]
    alive[0].mkdir()
    alive[1].write_text("")
    assert sorted(store.clean_leftovers()) == sorted(leftovers)
    assert all(not p.exists() for p in leftovers) and all(p.exists() for p in alive)
    assert store.versions() == [v1, ModelRef("shop", 2), ModelRef("shop", 3)]


def test_installing_can_link_instead_of_copying(store, tmp_path):
    bundle = _fake_bundle(tmp_path / "b", "x")
    target = store.install(bundle, ModelRef("shop", 1), link=True)
    assert (target / "model.tflite").stat().st_ino == (bundle / "model.tflite").stat().st_ino
    assert store.check(ModelRef("shop", 1)) is None
