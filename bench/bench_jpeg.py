"""The two-core 1/8-scale JPEG decoder against Pillow and maintained libjpeg-turbo bindings, in one run.

    python bench/bench_jpeg.py                 # speed: 12 MP photo, medians and ratios
    python bench/bench_jpeg.py --memory        # peak memory per decode (fresh processes)
    python bench/bench_jpeg.py --soak 30000    # resident memory over many calls

Speed: the same 12-megapixel phone-like JPEG (edge_demo's synthetic product photo, quality 90,
4:2:0, as bench_edge.py makes them) decoded at 1/8 scale, round-robin so that machine load hits
every decoder alike: `_jpeg8` on two threads and on one, Pillow's `draft()` decode (libjpeg-turbo
inside Pillow), simplejpeg (ships its own libjpeg-turbo; `min_factor` scaling) and PyTurboJPEG
(needs a system libturbojpeg 3.x; skipped with a message where it cannot load). Each decoder's
pixels are compared with Pillow's.

Memory: each case in a fresh process: peak resident memory of one decode above the process's
resident memory before it (VmHWM after resetting it through /proc/self/clear_refs; this sees C
allocations, which tracemalloc does not), the decoder's own count of its scratch memory, and what
stays resident after the call. `--module-root DIR` measures another build of `_jpeg8` (a folder
holding preprocessing/_jpeg8*.so), e.g. the one before a change.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = None  # the 200 MP case is measured on purpose

ROOT = Path(__file__).resolve().parent.parent


def make_photo_12mp() -> bytes:
    from edge_demo.synthetic import CATEGORIES, render_product

    image = render_product(CATEGORIES[0], np.random.default_rng([13, 0]), (4000, 3000))
    # sensor-like fine texture, so the bitstream is as dense as a phone's (~3 MB at quality 90)
    pixels = np.asarray(image).astype(np.int16)
    pixels += np.random.default_rng(7).integers(-12, 13, size=pixels.shape, dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_flat(width: int, height: int) -> bytes:
    sys.path.insert(0, str(ROOT))
    from tests.jpeg_forge import forge

    return forge(width, height, ((2, 2), (1, 1), (1, 1)))


CASES = {
    "12 MP photo": lambda: make_photo_12mp(),
    "50 MP flat frame": lambda: make_flat(8660, 5773),
    "200 MP flat frame (the cap)": lambda: make_flat(16330, 12247),
}


# ---- speed ----------------------------------------------------------------------------------------


def pillow_draft(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (image.size[0] // 8, image.size[1] // 8))
    return np.asarray(image)


def decoders(data: bytes, baseline_root: str | None = None) -> tuple[dict, list[str]]:
    from preprocessing import _fastjpeg

    width, height = Image.open(io.BytesIO(data)).size
    found: dict = {}
    notes: list[str] = []

    def fast(module, threads: int):
        def run() -> np.ndarray:
            w, h, c, pixels = module.decode_eighth(data, threads)
            return np.frombuffer(pixels, np.uint8).reshape(h, w, c)
        return run

    if _fastjpeg._jpeg8 is not None:
        found["_jpeg8, 2 threads"] = fast(_fastjpeg._jpeg8, 2)
        found["_jpeg8, 1 thread"] = fast(_fastjpeg._jpeg8, 1)
    else:
        notes.append("_jpeg8 is not compiled in: skipped")
    if baseline_root:
        found["_jpeg8 baseline, 2 thr"] = fast(load_jpeg8(baseline_root), 2)
        notes.append(f"baseline: the _jpeg8 build under {baseline_root}")
    found["Pillow draft (1/8)"] = lambda: pillow_draft(data)
    try:
        import simplejpeg

        found[f"simplejpeg {simplejpeg.__version__}"] = lambda: simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_width=-(-width // 8), min_height=-(-height // 8)
        )
    except ImportError:
        notes.append("simplejpeg not installed (pip install simplejpeg): skipped")
    try:
        import turbojpeg

        turbo = turbojpeg.TurboJPEG()
        found["PyTurboJPEG"] = lambda: turbo.decode(data, scaling_factor=(1, 8), pixel_format=turbojpeg.TJPF_RGB)
    except Exception as exc:  # ImportError, or no usable libturbojpeg.so on this machine
        notes.append(f"PyTurboJPEG unavailable ({str(exc).splitlines()[0][:90]}): skipped")
    return found, notes


def speed(repeats: int, baseline_root: str | None = None) -> dict:
    data = make_photo_12mp()
    found, notes = decoders(data, baseline_root)
    reference = pillow_draft(data)
    same = {}
    for name, run in found.items():
        pixels = np.asarray(run())
        same[name] = pixels.shape == reference.shape and bool(np.array_equal(pixels, reference))
    times: dict[str, list[float]] = {name: [] for name in found}
    for name, run in found.items():  # warm up: page faults, lazy loading
        run()
    for _ in range(repeats):
        for name, run in found.items():
            started = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - started) * 1000)
    medians = {name: statistics.median(values) for name, values in times.items()}
    fast = medians.get("_jpeg8, 2 threads")
    result = {
        "photo": f"4000x3000 4:2:0 q90, {len(data) / 1e6:.1f} MB",
        "repeats": repeats,
        "cores": os.cpu_count(),
        "decoders": {
            name: {
                "median_ms": round(medians[name], 2),
                "p90_ms": round(float(np.percentile(times[name], 90)), 2),
                "x_slower_than_jpeg8_2_threads": round(medians[name] / fast, 2) if fast else None,
                "same_pixels_as_pillow": same[name],
            }
            for name in found
        },
        "notes": notes,
    }
    print(f"\n12 MP photo ({result['photo']}) at 1/8 scale, {repeats} rounds, median (p90) ms:")
    for name, row in result["decoders"].items():
        ratio = f"{row['x_slower_than_jpeg8_2_threads']:.2f}x" if fast else "-"
        print(f"  {name:24s} {row['median_ms']:7.2f} ({row['p90_ms']:6.2f})  {ratio:>6s} of _jpeg8 2 threads"
              f"   same pixels as Pillow: {row['same_pixels_as_pillow']}")
    for note in notes:
        print(f"  note: {note}")
    return result


# ---- memory ---------------------------------------------------------------------------------------


def load_jpeg8(module_root: str | None):
    """The `_jpeg8` extension under `module_root` (another build), or this checkout's."""
    import importlib.util

    if not module_root:
        from preprocessing import _fastjpeg  # noqa: F401  (sets the decoder's limits)
        from preprocessing import _jpeg8

        return _jpeg8
    path = next(Path(module_root, "preprocessing").glob("_jpeg8*.so"))
    spec = importlib.util.spec_from_file_location("_jpeg8", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def memory_child(case_file: str, decoder: str, module_root: str | None) -> None:
    """One decode in this fresh process; prints JSON."""
    sys.path.insert(0, str(ROOT))
    data = Path(case_file).read_bytes()
    jpeg8 = load_jpeg8(module_root)
    if decoder == "pillow":
        pillow_draft(data)  # warm: imports, plugin set-up
    else:
        jpeg8.decode_eighth(b"\xff\xd8", 2)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    before = _status("VmRSS")
    if decoder == "pillow":
        result = pillow_draft(data)
        ok = result is not None
        del result
    else:
        ok = jpeg8.decode_eighth(data, 2) is not None
    peak = _status("VmHWM")
    after = _status("VmRSS")
    stats = jpeg8.memory_stats() if hasattr(jpeg8, "memory_stats") else {}
    print(json.dumps({"decoded": ok, "peak_above_start_mib": round((peak - before) / 2**20, 1),
                      "kept_after_call_mib": round((after - before) / 2**20, 1),
                      "scratch_peak_mib": round(stats.get("scratch_peak_bytes", 0) / 2**20, 1) if stats else None}))


def memory(module_root: str | None) -> dict:
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, make in CASES.items():
            path = Path(folder) / "case.jpg"
            data = make()
            path.write_bytes(data)
            row = {"file_mb": round(len(data) / 1e6, 2)}
            for decoder in ("jpeg8", "pillow"):
                command = [sys.executable, __file__, "--memory-child", str(path), decoder]
                if module_root:
                    command += ["--module-root", module_root]
                out = subprocess.run(command, capture_output=True, text=True, cwd=folder, timeout=300)
                if out.returncode != 0:
                    raise SystemExit(out.stderr)
                row[decoder] = json.loads(out.stdout.strip().splitlines()[-1])
            results[name] = row
    print(f"\npeak memory of one 1/8-scale decode (MiB above the process before it){' — ' + module_root if module_root else ''}:")
    for name, row in results.items():
        fast, pil = row["jpeg8"], row["pillow"]
        print(f"  {name:28s} {row['file_mb']:5.2f} MB file   _jpeg8: peak +{fast['peak_above_start_mib']:6.1f}"
              f" (scratch {fast['scratch_peak_mib']}), kept +{fast['kept_after_call_mib']:5.1f}"
              f"   Pillow: peak +{pil['peak_above_start_mib']:6.1f}, kept +{pil['kept_after_call_mib']:5.1f}"
              f"{'' if fast['decoded'] else '   (_jpeg8 declined)'}")
    return results


def soak(calls: int, module_root: str | None) -> dict:
    """Resident memory over `calls` decodes of mixed sizes (0.5 to 12 MP, a 50 MP frame now and then)."""
    sys.path.insert(0, str(ROOT))
    jpeg8 = load_jpeg8(module_root)
    from tests.jpeg_forge import forge

    from edge_demo.synthetic import CATEGORIES, render_product

    photos = []
    for i, size in enumerate([(800, 600), (1600, 1200), (2000, 1500), (3000, 2000), (4000, 3000)]):
        buffer = io.BytesIO()
        render_product(CATEGORIES[i % len(CATEGORIES)], np.random.default_rng([5, i]), size).save(
            buffer, "JPEG", quality=int(70 + 5 * i))
        photos.append(buffer.getvalue())
    huge = forge(8660, 5773, ((2, 2), (1, 1), (1, 1)))
    weights = [0.4, 0.25, 0.15, 0.1, 0.0995]
    rng = np.random.default_rng(30000)
    samples = []
    started = time.monotonic()
    for call in range(calls):
        data = huge if rng.random() < 0.0005 else photos[int(rng.choice(len(photos), p=np.array(weights) / sum(weights)))]
        jpeg8.decode_eighth(data, 2)
        if call % max(1, calls // 10) == 0 or call == calls - 1:
            samples.append((call + 1, round(_status("VmRSS") / 2**20, 1)))
    print(f"\nresident memory over {calls} calls ({time.monotonic() - started:.0f} s): "
          + ", ".join(f"{n}: {mib} MiB" for n, mib in samples))
    if hasattr(jpeg8, "memory_stats"):
        stats = jpeg8.memory_stats()
        print(f"  decoder's kept scratch: {stats['kept_bytes'] / 2**20:.1f} MiB"
              f" (limit {stats['keep_limit_bytes'] / 2**20:.0f} MiB)")
    return {"calls": calls, "rss_mib": samples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--memory", action="store_true", help="peak memory per decode instead of speed")
    parser.add_argument("--module-root", help="measure the _jpeg8 build under this folder (with --memory or --soak)")
    parser.add_argument("--baseline-root", help="also time the _jpeg8 build under this folder (speed)")
    parser.add_argument("--soak", type=int, metavar="CALLS", help="resident memory over CALLS decodes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--memory-child", nargs=2, metavar=("FILE", "DECODER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child, args.module_root)
        return 0
    sys.path.insert(0, str(ROOT))
    if args.memory:
        results = memory(args.module_root)
    elif args.soak:
        results = soak(args.soak, args.module_root)
    else:
        results = speed(args.repeats, args.baseline_root)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
