"""The synthetic product photos that the demo classifier is trained on.

The stories: a developer generates a data set, gets the same bytes every time for the same seed, finds it
laid out as the trainer expects, and gets photos that look like what shop devices send (EXIF-rotated ones,
12-megapixel ones). Small image sizes keep the whole file fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from edge_demo.synthetic import (
    CATEGORIES,
    DatasetSummary,
    GeneratorOptions,
    generate_dataset,
    main,
    render_product,
)

ORIENTATION = 0x0112

#: A small data set of small photos: two training and one validation image per category.
SMALL = GeneratorOptions(
    seed=7,
    splits=(("train", 2), ("val", 1)),
    long_side=(64, 128),
    large_fraction=0.0,
    exif_fraction=0.0,
)


def jpegs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def with_(options: GeneratorOptions, **changes: object) -> GeneratorOptions:
    fields = {name: getattr(options, name) for name in GeneratorOptions.__dataclass_fields__}
    return GeneratorOptions(**{**fields, **changes})  # type: ignore[arg-type]


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_photos(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "first", SMALL)
    generate_dataset(tmp_path / "again", SMALL)
    generate_dataset(tmp_path / "parallel", SMALL, workers=2)
    generate_dataset(tmp_path / "other", with_(SMALL, seed=8))

    first = jpegs(tmp_path / "first")
    assert len(first) == 3 * len(CATEGORIES)
    assert jpegs(tmp_path / "again") == first
    assert jpegs(tmp_path / "parallel") == first, "the number of workers must not change the output"
    other = jpegs(tmp_path / "other")
    assert other.keys() == first.keys()
    assert all(other[name] != first[name] for name in first)


def test_an_image_does_not_depend_on_what_else_is_generated(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "all", SMALL)
    generate_dataset(tmp_path / "books", with_(SMALL, categories=("book",), splits=(("val", 1),)))

    assert (tmp_path / "books/val/book/book_00000.jpg").read_bytes() == (
        tmp_path / "all/val/book/book_00000.jpg"
    ).read_bytes()


def test_the_data_set_is_laid_out_as_the_trainer_expects(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    summary = generate_dataset(tmp_path, SMALL, progress=lambda done, total: seen.append((done, total)))

    assert (tmp_path / "labels.txt").read_text().splitlines() == list(CATEGORIES)
    for split, count in (("train", 2), ("val", 1)):
        for category in CATEGORIES:
            names = sorted(p.name for p in (tmp_path / split / category).iterdir())
            assert names == [f"{category}_{i:05d}.jpg" for i in range(count)]
    with Image.open(tmp_path / "train/t-shirt/t-shirt_00001.jpg") as img:
        assert img.format == "JPEG" and img.mode == "RGB"
        assert 64 <= max(img.size) <= 128
    assert not [p for p in tmp_path.rglob(".*")], "no temporary files are left behind"

    assert isinstance(summary, DatasetSummary)
    assert summary.root == tmp_path
    assert summary.labels == CATEGORIES
    assert summary.counts == {"train": dict.fromkeys(CATEGORIES, 2), "val": dict.fromkeys(CATEGORIES, 1)}
    assert (summary.large_images, summary.exif_images) == (0, 0)
    assert seen[-1] == (18, 18)


def test_counts_follow_the_options_and_a_rerun_leaves_no_stale_photos(tmp_path: Path) -> None:
    generate_dataset(tmp_path, with_(SMALL, splits=(("train", 3),), categories=("mug", "bottle")))
    summary = generate_dataset(tmp_path, with_(SMALL, splits=(("train", 1), ("test", 0)), categories=("mug", "bottle")))

    assert summary.counts == {"train": {"mug": 1, "bottle": 1}, "test": {"mug": 0, "bottle": 0}}
    assert sorted(p.name for p in (tmp_path / "train/mug").iterdir()) == ["mug_00000.jpg"]
    assert list((tmp_path / "test/bottle").iterdir()) == []
    assert (tmp_path / "labels.txt").read_text() == "mug\nbottle\n"


def test_exif_rotated_photos_come_upright_after_exif_transpose(tmp_path: Path) -> None:
    upright_options = with_(SMALL, splits=(("train", 2),))
    generate_dataset(tmp_path / "upright", upright_options)
    summary = generate_dataset(tmp_path / "rotated", with_(upright_options, exif_fraction=1.0))

    assert summary.exif_images == 2 * len(CATEGORIES)
    orientations = set()
    for name in jpegs(tmp_path / "rotated"):
        with Image.open(tmp_path / "rotated" / name) as stored, Image.open(tmp_path / "upright" / name) as upright:
            orientation = stored.getexif().get(ORIENTATION)
            assert orientation in (3, 6, 8)
            orientations.add(orientation)
            if orientation in (6, 8):
                assert stored.size == upright.size[::-1]
            shown = ImageOps.exif_transpose(stored)
            assert shown.size == upright.size
            # the same picture up to JPEG noise (a wrong turn differs by 25 or more)
            difference = np.abs(np.asarray(shown.reduce(4), np.int16) - np.asarray(upright.reduce(4), np.int16))
            assert difference.mean() < 6, f"{name} (orientation {orientation}) is not the upright photo"
    assert len(orientations) >= 2


def test_a_large_fraction_of_one_gives_12_megapixel_photos(tmp_path: Path) -> None:
    options = with_(SMALL, splits=(("test", 1),), categories=("sneaker",), large_fraction=1.0)
    summary = generate_dataset(tmp_path, options)

    assert summary.large_images == 1
    with Image.open(tmp_path / "test/sneaker/sneaker_00000.jpg") as img:
        assert img.size in ((4000, 3000), (3000, 4000))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", -1),
        ("splits", (("train", -1),)),
        ("splits", (("../escape", 1),)),
        ("splits", (("train", 1), ("train", 2))),
        ("splits", ()),
        ("long_side", (800, 600)),
        ("long_side", (0, 600)),
        ("long_side", 640),
        ("large_fraction", 1.5),
        ("exif_fraction", -0.1),
        ("jpeg_quality", (50, 101)),
        ("jpeg_quality", (90, 60)),
        ("categories", ("mug", "teapot")),
        ("categories", ()),
    ],
)
def test_bad_options_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        GeneratorOptions(**{field: value})  # type: ignore[arg-type]


def test_an_unknown_category_or_bad_worker_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="category"):
        render_product("teapot", np.random.default_rng(0), (100, 100))
    with pytest.raises(ValueError, match="workers"):
        generate_dataset(tmp_path, SMALL, workers=0)


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_category_renders_a_product_not_a_flat_colour(category: str) -> None:
    img = render_product(category, np.random.default_rng(3), (160, 120))

    assert img.mode == "RGB" and img.size == (160, 120)
    pixels = np.asarray(img, dtype=np.float32)
    assert pixels.std() > 10
    assert len(np.unique(pixels.reshape(-1, 3) // 32, axis=0)) > 5


def test_the_command_line_prints_a_one_line_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path), "--seed", "3", "--train", "1", "--val", "0", "--test", "1", "--large-fraction", "0"]
    assert main(argv) == 0

    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "12 images" in out[0]
    assert len(list(tmp_path.rglob("*.jpg"))) == 12
    assert main([str(tmp_path), "--large-fraction", "2"]) == 2
    assert "large_fraction" in capsys.readouterr().err
