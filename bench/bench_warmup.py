"""The first request to a freshly loaded version: cold (load only) against warmed (load, then its warm-up).

    python bench/bench_warmup.py [--models demo,mobilenetv2] [--saved-model DIR] [--runs 3]

For each model (`demo`: demo-output/model or `--saved-model`, the 96x96 demo architecture; `mobilenetv2`:
`MobileNetV2(weights=None)` at 224x224, built by bench_server.build_mobilenetv2, nothing downloaded)
it writes the converter's warm-up records (converter.warmup, from synthetic shop photos prepared with
the model's float spec) into a copy of the SavedModel, then, each in a fresh Python process (TensorFlow's
lazy initialisation is per process):

  cold    tf.saved_model.load, then one photo (batch 1), a second photo, then two batches of 8: the old
          embedded path;
  warmed  EmbeddedPredictor's load (which runs the warm-up records), then the same two photos, then two
          batches of 8 (a shape the records did not hold).

It prints the median over `--runs` processes. Timings on a shared machine are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(mode: str, folder: Path, photo: Path) -> dict[str, float]:
    import numpy as np

    from preprocessing import PreprocessSpec, preprocess

    spec = PreprocessSpec.from_json((folder / "preprocess_spec.json").read_bytes())
    one = np.asarray(preprocess(photo, spec), dtype=np.float32)[None]
    started = time.perf_counter()
    import tensorflow as tf

    imported = time.perf_counter() - started
    if mode == "cold":
        started = time.perf_counter()
        model = tf.saved_model.load(str(folder))
        fn = model.signatures["serving_default"]
        name = next(iter(fn.structured_input_signature[1]))
        load = time.perf_counter() - started

        def call(batch: np.ndarray) -> None:
            fn(**{name: tf.constant(batch)})
    else:
        from sync_server.predict.embedded import EmbeddedPredictor
        from sync_server.serving_repo import ServingRepository

        repo = ServingRepository(folder.parents[2])
        predictor = EmbeddedPredictor(repo)
        started = time.perf_counter()
        loaded = predictor._get(folder.parent.name, int(folder.name))
        load = time.perf_counter() - started
        assert loaded.warmup_source == "records", loaded.warmup_source

        def call(batch: np.ndarray) -> None:
            predictor._predict_sync(folder.parent.name, int(folder.name), batch)
    result = {"import_s": imported, "load_s": load}
    eight = np.repeat(one, 8, axis=0)
    for key, batch in (("first_ms", one), ("second_ms", one), ("batch8_first_ms", eight), ("batch8_second_ms", eight)):
        started = time.perf_counter()
        call(batch)
        result[key] = (time.perf_counter() - started) * 1000
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,mobilenetv2")
    parser.add_argument("--saved-model", type=Path, default=ROOT / "demo-output" / "model")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "FOLDER", "PHOTO"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return 0

    from bench.bench_server import build_mobilenetv2
    from converter.saved_model import SavedModelClassifier
    from converter.warmup import build_warmup, warmup_batches
    from converter.serving import WARMUP_FILE
    from edge_demo.synthetic import GeneratorOptions, generate_dataset

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-warmup-"))
    data = work / "data"
    if not data.exists():
        generate_dataset(data, GeneratorOptions(seed=1, splits=(("train", 2), ("val", 1), ("test", 1)), long_side=(480, 800)))
    photos = sorted((data / "train").rglob("*.jpg"))
    sources = {"demo": args.saved_model, "mobilenetv2": work / "mobilenetv2"}
    print(f"{'model':<12} {'mode':<7} {'load s':>7} {'1st ms':>8} {'2nd ms':>8} {'1st batch8 ms':>14} {'2nd batch8 ms':>14}  (median of {args.runs})")
    for model in args.models.split(","):
        source = sources[model] if model == "demo" else build_mobilenetv2(sources[model], data)
        target = work / "repo" / "models" / model / "1"
        if not target.exists():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.keras"))
            classifier = SavedModelClassifier(target)
            records = build_warmup(model, classifier.input_name, warmup_batches(photos, classifier.spec))
            (target / WARMUP_FILE).parent.mkdir(exist_ok=True)
            (target / WARMUP_FILE).write_bytes(records.data)
        for mode in ("cold", "warmed"):
            runs = []
            for _ in range(args.runs):
                out = subprocess.run([sys.executable, __file__, "--child", mode, str(target), str(photos[-1])],
                                     capture_output=True, text=True, check=True, timeout=600)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"{model:<12} {mode:<7} {med['load_s']:>7.2f} {med['first_ms']:>8.1f} {med['second_ms']:>8.1f} "
                  f"{med['batch8_first_ms']:>14.1f} {med['batch8_second_ms']:>14.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
