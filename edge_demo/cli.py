"""`edge-demo`: the main job on embedded defaults, end to end, for a newcomer's first run.

Today it generates the synthetic shop photos, trains the demo classifier and prints its accuracy.
Later steps (convert, serve, classify) join as their parts are built.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_WORKDIR = Path("demo-output")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="edge-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where data and models go (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=300, help="training photos per category (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the trainer's)")
    parser.add_argument("--retrain", action="store_true", help="train again even if a model is already there")
    args = parser.parse_args(argv)
    if args.per_class < 5:
        parser.error("--per-class must be at least 5")

    from edge_demo.synthetic import GeneratorOptions, generate_dataset

    data_dir = args.workdir / "data"
    model_dir = args.workdir / "model"
    options = GeneratorOptions(
        seed=args.seed,
        splits=(("train", args.per_class), ("val", max(2, args.per_class // 5)), ("test", max(2, args.per_class // 5))),
    )
    stamp = data_dir / ".options.json"
    wanted = json.dumps({"seed": options.seed, "splits": options.splits})
    _step("1/2 demo data")
    if stamp.is_file() and stamp.read_text() == wanted:
        print(f"      reusing {data_dir} (same seed and sizes)")
    else:
        started = time.perf_counter()
        summary = generate_dataset(data_dir, options, workers=2)
        stamp.write_text(wanted)
        total = sum(sum(c.values()) for c in summary.counts.values())
        print(
            f"      {total} synthetic photos of {len(summary.labels)} categories in {data_dir} "
            f"({summary.large_images} at 12 MP, {summary.exif_images} with EXIF rotation) "
            f"in {time.perf_counter() - started:.0f} s"
        )

    _step("2/2 demo model")
    from edge_demo.train import TrainingError, TrainOptions, train

    report_file = model_dir / "training.json"
    if report_file.is_file() and not args.retrain and not stamp_changed(stamp, report_file):
        report = json.loads(report_file.read_text())
        print(f"      reusing {model_dir} (use --retrain to train again)")
        val, test = report.get("val_accuracy"), report.get("test_accuracy")
    else:
        train_options = TrainOptions(seed=args.seed) if args.epochs is None else TrainOptions(seed=args.seed, epochs=args.epochs)
        try:
            result = train(data_dir, model_dir, train_options, progress=sys.stdout.isatty(), overwrite=True)
        except TrainingError as exc:
            print(f"edge-demo: {exc}", file=sys.stderr)
            return 2
        val, test = result.val_accuracy, result.test_accuracy
        print(f"      trained in {result.seconds:.0f} s, {result.epochs} epochs; SavedModel in {model_dir}")
    print(f"      validation accuracy {val:.1%}" + (f", test accuracy {test:.1%}" if test is not None else ""))
    return 0


def stamp_changed(stamp: Path, report_file: Path) -> bool:
    """True when the data was regenerated after the model was trained."""
    return stamp.stat().st_mtime > report_file.stat().st_mtime


def _step(title: str) -> None:
    print(f"==> {title}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
