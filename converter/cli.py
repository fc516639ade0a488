"""`edge-convert`: turn a SavedModel into a verified, signed TFLite bundle (and friends).

    edge-convert [convert] SAVED_MODEL --out BUNDLE_DIR [options]   the default command
    edge-convert keygen --out KEY                                   Ed25519 key pair: KEY and KEY.pub
    edge-convert inspect BUNDLE [--public-key KEY.pub]              check a bundle and summarise it
    edge-convert serving-export SAVED_MODEL --repo REPO --name NAME [--version N]

Exit status: 0 done, 1 the validation gate (or an inspected bundle's smoke test) failed, 2 bad usage or
input. Errors are one line on stderr; set EDGE_CONVERT_DEBUG=1 to see a traceback for internal errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from .errors import ConversionError, ValidationGateError
from .options import (
    DEFAULT_CALIBRATION_LIMIT,
    DEFAULT_CONFIDENCE_THRESHOLD,
    DEFAULT_WARMUP_PHOTOS,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_MIN_CLASS_AGREEMENT,
)

PROG = "edge-convert"
COMMANDS = ("convert", "keygen", "inspect", "serving-export")
DEBUG_ENV = "EDGE_CONVERT_DEBUG"


def main(argv: Sequence[str] | None = None) -> int:
    """Run `edge-convert`; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] not in COMMANDS and args_list[0] not in ("-h", "--help"):
        args_list.insert(0, "convert")
    parser = _parser()
    if not args_list:
        parser.print_help(sys.stderr)
        return 2
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exit_:  # argparse already printed usage and the error
        return int(exit_.code or 0)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return int(args.run(args))
    except ValidationGateError as exc:
        _print_gate_failure(exc, args)
        return exc.exit_code
    except ConversionError as exc:
        _fail(args, exc, exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line unless debugging  # noqa: BLE001
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        _fail(args, exc, 3, prefix=f"internal error ({type(exc).__name__}), set {DEBUG_ENV}=1 for details: ")
        return 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Turn a SavedModel into a verified, signed TFLite model bundle.",
        epilog="Without a command, `convert` is assumed: edge-convert SAVED_MODEL --out BUNDLE_DIR ...",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    convert = commands.add_parser("convert", help="convert a SavedModel into a bundle (the default)",
                                  description="Convert a SavedModel into a verified, signed TFLite bundle.")
    convert.add_argument("saved_model", metavar="SAVED_MODEL", type=Path, help="SavedModel folder")
    convert.add_argument("--out", required=True, type=Path, metavar="BUNDLE_DIR", help="bundle folder to create")
    convert.add_argument("--quantize", choices=("float32", "dynamic", "float16", "int8"), default=None,
                         help="float32 | dynamic (int8 weights) | float16 (GPU) | int8 (full integer, uint8 "
                              "in/out); default float32, or float16 with --target gpu")
    convert.add_argument("--calibration", type=Path, metavar="DIR",
                         help="photos to calibrate int8 on (any layout; needed for int8 unless the model was "
                              "trained quantization-aware)")
    convert.add_argument("--calibration-limit", type=int, default=DEFAULT_CALIBRATION_LIMIT, metavar="N",
                         help="use at most N calibration photos, spread over the folder (default %(default)s)")
    convert.add_argument("--validation", type=Path, metavar="DIR",
                         help="labelled photos, DIR/<label>/<photo>, to compare the models on (required "
                              "unless --skip-validation)")
    convert.add_argument("--skip-validation", action="store_true",
                         help="write the bundle without the agreement gate (its manifest says so)")
    convert.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT, metavar="X",
                         help="fail below this top-1 agreement with the SavedModel (default %(default)s)")
    convert.add_argument("--min-class-agreement", type=float, default=DEFAULT_MIN_CLASS_AGREEMENT, metavar="X",
                         help="fail when any one label's agreement is below this (default %(default)s)")
    convert.add_argument("--labels", type=Path, metavar="FILE", help="labels file (default: SAVED_MODEL/labels.txt)")
    convert.add_argument("--spec", type=Path, metavar="FILE",
                         help="PreprocessSpec JSON (default: SAVED_MODEL/preprocess_spec.json)")
    convert.add_argument("--name", help="bundle name (default: the SavedModel folder's name)")
    convert.add_argument("--version", type=int, metavar="N",
                         help="bundle version, shared with TF Serving (default: next free in --serving-repo, else 1)")
    convert.add_argument("--target", choices=("cpu", "gpu"), default="cpu",
                         help="gpu picks float16 and checks which ops would fall back to the CPU")
    convert.add_argument("--confidence-threshold", type=float, default=DEFAULT_CONFIDENCE_THRESHOLD, metavar="X",
                         help="default threshold below which devices ask the server (default %(default)s)")
    signing = convert.add_mutually_exclusive_group()
    signing.add_argument("--sign-key", type=Path, metavar="FILE",
                         help="Ed25519 private key (PEM) that signs the manifest; see `keygen`")
    signing.add_argument("--unsigned", action="store_true",
                         help="write no manifest.sig (devices refuse such bundles: for experiments only)")
    convert.add_argument("--serving-repo", type=Path, metavar="REPO",
                         help="also lay the SavedModel into a TF Serving repository as REPO/NAME/VERSION/")
    convert.add_argument("--warmup-photos", type=int, default=DEFAULT_WARMUP_PHOTOS, metavar="N",
                         help="calibration (else validation) photos written as the TF Serving version's warm-up "
                              "requests, assets.extra/tf_serving_warmup_requests; 0 writes none (default %(default)s)")
    convert.add_argument("--pixel-signatures", action=argparse.BooleanOptionalAction, default=None,
                         help="give the TF Serving version `pixels` (uint8 [N,H,W,3]) and `pixels_png` signatures "
                              "that normalise in the graph, so the server forwards a device's fitted pixels as "
                              "uint8 (150 KB for 224x224) instead of float32 (602 KB); the copy with them is what "
                              "is converted, validated and exported (default: on with --serving-repo)")
    convert.add_argument("--threads", type=int, default=1, metavar="N",
                         help="LiteRT threads when measuring latency (default %(default)s)")
    convert.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    convert.add_argument("--json", action="store_true", help="print the report as JSON")
    convert.add_argument("--verbose", action="store_true", help="also print TensorFlow's converter log")
    convert.set_defaults(run=_run_convert)

    keygen = commands.add_parser("keygen", help="make an Ed25519 key pair for signing bundles",
                                 description="Write KEY (private, mode 0600) and KEY.pub (public).")
    keygen.add_argument("--out", required=True, type=Path, metavar="KEY", help="private key file to create")
    keygen.add_argument("--force", action="store_true", help="replace existing key files")
    keygen.set_defaults(run=_run_keygen)

    inspect = commands.add_parser("inspect", help="verify a bundle and print its manifest summary",
                                  description="Check hashes, signature, metadata and smoke test of a bundle.")
    inspect.add_argument("bundle", metavar="BUNDLE", type=Path)
    inspect.add_argument("--public-key", type=Path, metavar="KEY",
                         help="trusted public key; with it, an unsigned or mismatching bundle is an error")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(run=_run_inspect)

    serving = commands.add_parser("serving-export", help="lay a SavedModel into a TF Serving repository",
                                  description="Copy a SavedModel to REPO/NAME/VERSION/ atomically.")
    serving.add_argument("saved_model", metavar="SAVED_MODEL", type=Path)
    serving.add_argument("--repo", required=True, type=Path, metavar="REPO")
    serving.add_argument("--name", required=True)
    serving.add_argument("--version", type=int, metavar="N", help="default: the next free version")
    serving.add_argument("--warmup-from", type=Path, metavar="DIR",
                         help="photos for the warm-up requests (default: a mid-grey photo of the input's shape)")
    serving.add_argument("--no-warmup", action="store_true",
                         help="write no assets.extra/tf_serving_warmup_requests (and keep TensorFlow unloaded)")
    serving.set_defaults(run=_run_serving_export)
    return parser


def _run_convert(args: argparse.Namespace) -> int:
    from .options import ConvertOptions, QuantizationOptions, SigningOptions, ValidationOptions
    from .progress import stderr_is_terminal

    options = ConvertOptions(
        out=args.out,
        quantization=QuantizationOptions(args.quantize, args.calibration, args.calibration_limit),
        validation=ValidationOptions(images=args.validation, min_agreement=args.min_agreement,
                                     min_class_agreement=args.min_class_agreement, threads=args.threads,
                                     skip=args.skip_validation),
        signing=SigningOptions(key=args.sign_key, unsigned=args.unsigned),
        target=args.target,
        labels=args.labels,
        spec=args.spec,
        name=args.name,
        version=args.version,
        confidence_threshold=args.confidence_threshold,
        serving_repo=args.serving_repo,
        warmup_photos=args.warmup_photos,
        # on by default with --serving-repo: the server then forwards uint8 pixels, a quarter of float32's bytes
        pixel_signatures=args.serving_repo is not None if args.pixel_signatures is None else args.pixel_signatures,
        overwrite=args.force,
        show_progress=stderr_is_terminal() and not args.json,
    )
    options.checked()  # usage errors before TensorFlow is imported
    from .pipeline import convert

    result = convert(args.saved_model, options)
    if args.verbose:
        print(result.converter_log, file=sys.stderr)
    if args.json:
        print(json.dumps(_result_json(result), indent=2))
        return 0
    m = result.manifest
    signed = f"signed by key {m.signing['key_id']}" if m.signing else "UNSIGNED: devices will refuse it"
    print(f"bundle {result.bundle}: {m.name} version {m.version}, {m.quantization}, "
          f"model.tflite {m.model_size / 1024:.1f} KiB, {signed}")
    from .report import format_baseline, format_gpu, format_validation

    if result.validation is not None:
        print(format_validation(result.validation, m.quantization))
    if m.baseline is not None:
        print(format_baseline(m.baseline, m.labels))
    else:
        print("validation skipped (--skip-validation): the agreement gate did not run")
    if result.gpu is not None:
        print(format_gpu(result.gpu))
    if result.serving_path is not None:
        serving = m.serving or {}
        signatures = ", ".join(serving.get("signatures") or ())
        warmup = serving.get("warmup")
        print(f"TF Serving version {result.serving_path}: signatures {signatures or '?'}"
              + (f", {warmup['records']} warm-up requests" if warmup else ", no warm-up requests"))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"converted in {result.seconds:.1f} s")
    return 0


def _result_json(result: Any) -> dict[str, Any]:
    m = result.manifest
    return {
        "ok": True,
        "bundle": str(result.bundle),
        "name": m.name,
        "version": m.version,
        "quantization": m.quantization,
        "target": m.target,
        "model": {"file": m.model_file, "sha256": m.model_sha256, "size": m.model_size},
        "input": m.input.to_dict(),
        "output": m.output.to_dict(),
        "signing": m.signing,
        "validation": None if result.validation is None else result.validation.to_dict(),
        "baseline": None if m.baseline is None else m.baseline.to_dict(),
        "gpu": None if result.gpu is None else result.gpu.to_dict(),
        "serving_path": None if result.serving_path is None else str(result.serving_path),
        "smoke_test": [{"label": c.expected_label, "source": c.source} for c in m.smoke_test.cases],
        "warnings": list(result.warnings),
        "seconds": round(result.seconds, 2),
    }


def _run_keygen(args: argparse.Namespace) -> int:
    from .signing import key_id, load_public_key, write_keypair

    private, public = write_keypair(args.out, overwrite=args.force)
    print(f"wrote {private} (private: keep it secret, sign with --sign-key {private})")
    print(f"wrote {public} (public: give it to devices and the server); key id {key_id(load_public_key(public))}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from .bundle import read_bundle

    bundle = read_bundle(args.bundle, args.public_key, require_signature=args.public_key is not None)
    checks: dict[str, Any] = {"hashes": "ok", "signature": bundle.signature, "key_id": bundle.key_id}
    model = bundle.read_model()
    try:
        from .metadata import read_metadata

        meta = read_metadata(model)
        checks["metadata"] = "ok" if meta.labels == bundle.labels else "labels differ from the manifest"
    except ConversionError as exc:
        checks["metadata"] = str(exc)
    from .lite_model import LiteClassifier
    from .progress import native_log_captured
    from .smoke import run_smoke_test

    with native_log_captured(), LiteClassifier(model) as lite:  # LiteRT logs its delegate on stderr
        smoke = run_smoke_test(bundle.manifest.smoke_test, lite, bundle.spec, bundle.labels)
    checks["smoke_test"] = "passed" if smoke.passed else "FAILED"
    m = bundle.manifest
    if args.json:
        print(json.dumps({"ok": smoke.passed and checks["metadata"] == "ok", "checks": checks,
                          "manifest": _summary(m)}, indent=2))
    else:
        signature = {"verified": f"verified (key {bundle.key_id})", "unsigned": "NONE (unsigned bundle)",
                     "not_checked": "present, not checked (pass --public-key)"}[bundle.signature]
        print(f"{m.name} version {m.version} ({m.quantization}, target {m.target}), created {m.created}")
        print(f"  model     {m.model_file} {m.model_size} bytes sha256 {m.model_sha256[:16]}... ok")
        print(f"  signature {signature}")
        print(f"  input     {m.input.dtype} {list(m.input.shape)}" + _q(m.input.quantization))
        print(f"  output    {m.output.dtype} {list(m.output.shape)}" + _q(m.output.quantization))
        print(f"  spec      {m.preprocess_spec.width}x{m.preprocess_spec.height} {m.preprocess_spec.fit}, "
              f"{m.preprocess_spec.dtype}")
        print(f"  labels    {', '.join(m.labels)}")
        print(f"  metadata  {checks['metadata']}")
        print(f"  smoke     {checks['smoke_test']} ({len(smoke.outcomes)} golden photos)")
        if m.validation is not None:
            v = m.validation
            print(f"  validated on {v.images} photos: agreement {v.agreement:.1%}, TFLite accuracy "
                  f"{v.tflite.accuracy:.1%} (SavedModel {v.saved_model.accuracy:.1%})")
        else:
            print("  validation skipped at conversion")
    return 0 if smoke.passed and checks["metadata"] == "ok" else 1


def _summary(m: Any) -> dict[str, Any]:
    data = m.to_dict()
    data["smoke_test"] = {"tolerance": m.smoke_test.tolerance,
                          "cases": [{"label": c.expected_label, "source": c.source} for c in m.smoke_test.cases]}
    return data


def _q(quantization: tuple[float, int] | None) -> str:
    return "" if quantization is None else f" scale {quantization[0]:.6g} zero point {quantization[1]}"


def _run_serving_export(args: argparse.Namespace) -> int:
    from .serving import WARMUP_FILE, export_for_serving, next_version, version_path

    version = args.version or next_version(args.repo, args.name)
    version_path(args.repo, args.name, version)  # refuses a taken version before the SavedModel loads
    warmup = None
    if not args.no_warmup:
        from .pipeline import warmup_for_serving

        warmup = warmup_for_serving(args.saved_model, args.name, args.warmup_from)
    path = export_for_serving(args.saved_model, args.repo, args.name, version, warmup=warmup and warmup.data)
    if warmup is not None:
        print(f"warm-up requests {path / WARMUP_FILE} ({warmup.records}, batch sizes "
              f"{', '.join(map(str, warmup.batch_sizes))})")
    print(f"TF Serving version {path}")  # last: scripts read the path from the final line
    return 0


def _fail(args: argparse.Namespace, exc: BaseException, code: int, prefix: str = "") -> None:
    message = prefix + (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": {"type": type(exc).__name__, "message": message,
                                                 "exit_code": code}}, indent=2))
    print(f"{PROG}: {message}", file=sys.stderr)


def _print_gate_failure(exc: ValidationGateError, args: argparse.Namespace) -> None:
    report = exc.report
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": {"type": type(exc).__name__, "message": str(exc),
                                                 "exit_code": exc.exit_code},
                          "validation": None if report is None else report.to_dict()}, indent=2))
    elif report is not None:
        from .report import format_validation

        print(format_validation(report, getattr(args, "quantize", None) or ""))
    print(f"{PROG}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
