"""A device keeps model versions side by side and switches between them atomically."""

from __future__ import annotations

import json
import os

import pytest

from edge_runtime.errors import StoreError
from edge_runtime.store import ModelRef, ModelStore, default_home


def _fake_bundle(folder, marker: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.tflite").write_bytes(b"TFL3" + marker.encode())
    (folder / "manifest.json").write_text(json.dumps({"marker": marker}))
    (folder / "labels.txt").write_text("mug\nbook\n")
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
