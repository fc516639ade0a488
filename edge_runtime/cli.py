"""`edge-classify`: classify photos on the device, and manage its local model store.

    edge-classify PATH... [--model BUNDLE] [--top-k N] [--json] [--threads N] [--delegate auto|cpu|gpu]
                          [--fallback auto|never|always] [--server URL] [--threshold X]
    edge-classify models list | use VERSION | rollback | install BUNDLE | path

Exit status: 0 when every photo was classified, 1 when some inputs were bad, 2 for a usage or
model error. Imports no TensorFlow: start-up is what a kiosk waits for.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

# The device's command does no linear algebra: one OpenBLAS thread halves numpy's import time (its
# thread pool start-up is most of it), which is most of a cold start. Set before numpy loads; a value
# the user exported wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from ._cli import OneLineParser  # noqa: E402
from .errors import EdgeRuntimeError  # noqa: E402

if TYPE_CHECKING:  # loaded inside `_classify`, after its arguments parse
    from .classifier import ClassifierOptions
    from .pipeline import EarlyStart

EXIT_OK, EXIT_BAD_INPUT, EXIT_ERROR = 0, 1, 2
SERVER_ENV = "EDGE_CLASSIFY_SERVER"
TOKEN_ENV = "EDGE_CLASSIFY_TOKEN"
#: Up to this many photo files (no folders), decoding starts before the model is loaded.
EARLY_PHOTOS = 2
#: ... and only for model inputs up to this size (the spec is read before its signature is checked).
EARLY_MAX_INPUT_PIXELS = 1024 * 1024


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `edge-classify`; `argv` None means this process's own command line."""
    code = _main(list(sys.argv[1:] if argv is None else argv))
    if argv is None:
        # The process exits next, and its last garbage collection would walk every object numpy,
        # Pillow and LiteRT made (about 20 ms, a tenth of a cold start on a 2-core kiosk) to free
        # memory the OS reclaims anyway: frozen objects are skipped. Not for in-process callers,
        # who would keep garbage.
        gc.freeze()
    return code


def _main(argv: list[str]) -> int:
    warnings.simplefilter("default")
    warnings.showwarning = _one_line_warning
    try:
        if argv and argv[0] == "models":
            return _models(argv[1:])
        return _classify(argv)
    except EdgeRuntimeError as exc:
        print(f"edge-classify: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except SystemExit as exc:  # argparse's --help and usage errors: return, don't exit, when called in-process
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _classify_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="edge-classify",
        description="Classify product photos on this device (LiteRT), asking the server when unsure.",
        epilog="Manage installed models with `edge-classify models list|use|rollback|install|path`.",
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="photo files or folders (walked)")
    parser.add_argument("--model", help="a bundle folder (default: the device's current model)")
    parser.add_argument("--top-k", type=int, default=3, help="categories to show per photo (default: 3)")
    parser.add_argument("--json", action="store_true", help="one JSON object per photo per line")
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads")
    parser.add_argument("--delegate", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--gpu-delegate", metavar="LIB", help="path of the TFLite GPU delegate library")
    parser.add_argument("--fallback", choices=("auto", "never", "always"), default="auto",
                        help="ask the server's full model: when unsure (auto), never, or always")
    parser.add_argument("--server", default=os.environ.get(SERVER_ENV), help=f"sync server URL (or ${SERVER_ENV})")
    parser.add_argument("--threshold", type=float, default=None,
                        help="ask the server below this top score (default: the model's)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the server (default: 2)")
    parser.add_argument("--public-key", help="publisher public key (default: $EDGE_CLASSIFY_PUBLIC_KEY or the store's trusted.pub)")
    parser.add_argument("--workers", type=int, default=2, help="decode threads (default: 2)")
    parser.add_argument("--verbose", "-v", action="store_true", help="say which model, backend and delegate run")
    parser.add_argument("--version", action="store_true", help="print versions and the interpreter backend")
    return parser


def _classify(argv: list[str]) -> int:
    parser = _classify_parser()
    args = parser.parse_args(argv)
    if args.version:
        return _print_version()
    if not args.paths:
        parser.error("give at least one photo or folder")
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        parser.error("--threshold must be between 0 and 1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")

    from .classifier import Classifier, ClassifierOptions
    from .pipeline import PipelineOptions, classify_paths

    try:
        options = ClassifierOptions(
            model=args.model, top_k=args.top_k, threads=args.threads, delegate=args.delegate,
            gpu_delegate_path=args.gpu_delegate, public_key=args.public_key,
        )
        fallback = None
        if args.server and args.fallback != "never":
            from .fallback import FallbackClient, FallbackOptions

            fallback = FallbackClient(FallbackOptions(args.server, args.timeout, os.environ.get(TOKEN_ENV)))
        pipeline = PipelineOptions(workers=args.workers, fallback=args.fallback, threshold=args.threshold)
    except ValueError as exc:
        parser.error(str(exc))
    early = _early_start(args.paths, options, keep_bytes=fallback is not None and args.fallback != "never")
    try:
        with Classifier.create_from_options(options) as classifier:
            if args.verbose:
                print("edge-classify: " + json.dumps(classifier.describe()), file=sys.stderr)
            paths = list(_expand(args.paths))
            bad = 0
            progress = _Progress(len(paths)) if sys.stderr.isatty() and len(paths) > 20 else None
            for result in classify_paths(paths, classifier, pipeline, fallback, early):
                bad += result.error is not None
                if progress:
                    progress.step()
                print(json.dumps(result.to_dict()) if args.json else _human(result), flush=True)
            if progress:
                progress.done()
    finally:
        if early is not None:
            early.close()
    return EXIT_BAD_INPUT if bad else EXIT_OK


def _early_start(raw_paths: list[str], options: ClassifierOptions, *, keep_bytes: bool) -> EarlyStart | None:
    """Start decoding a few photo files while the model loads; None where that does not apply.

    Folders keep the pipeline's worker pool. The spec is read from the manifest before it is verified:
    `classify_paths` throws the work away unless the verified spec is the same.
    """
    from .bundles import peek_spec
    from .classifier import locate_model
    from .pipeline import EarlyStart

    if len(raw_paths) > EARLY_PHOTOS or any(Path(p).is_dir() for p in raw_paths):
        return None
    try:
        bundle, _key = locate_model(options)
    except EdgeRuntimeError:
        return None  # `Classifier.create_from_options` reports it
    spec = peek_spec(bundle)
    if spec is None or spec.height * spec.width > EARLY_MAX_INPUT_PIXELS:
        return None  # an unverified manifest must not make us allocate much before it is checked
    return EarlyStart(raw_paths, spec, keep_bytes=keep_bytes)


def _expand(paths: list[str]) -> Iterator[str]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            from preprocessing import DatasetError, list_images

            try:
                yield from (str(p) for p in list_images(path))
            except DatasetError:
                yield raw
        else:
            yield raw  # a missing file is reported per photo, as not_found


def _human(result) -> str:  # noqa: ANN001
    if result.error is not None:
        return f"{result.path}: error {result.error['code']}: {result.error['message']}"
    tops = "  ".join(f"{c.label} {c.score:.2f}" for c in result.categories)
    where = result.source
    if result.fallback and result.fallback.startswith("unavailable"):
        where += f"; server {result.fallback}"
    return f"{result.path}: {tops}  ({where}, {result.latency_ms:.1f} ms)"


def _print_version() -> int:
    from importlib import metadata

    from .backends import find_backend

    try:
        own = metadata.version("edge-classify")
    except metadata.PackageNotFoundError:
        own = "unknown"
    print(f"edge-classify {own} (interpreter: {find_backend().describe()})")
    return EXIT_OK


def _models(argv: list[str]) -> int:
    from .store import ModelRef, ModelStore

    parser = OneLineParser(prog="edge-classify models", description="Manage the device's local model store.")
    parser.add_argument("--home", help="the store's folder (default: $EDGE_CLASSIFY_HOME)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("list", help="installed versions, current and previous marked (default)")
    use = sub.add_parser("use", help="switch to an installed version")
    use.add_argument("version", help="VERSION or NAME:VERSION")
    sub.add_parser("rollback", help="switch back to the previous version")
    install = sub.add_parser("install", help="verify a bundle and install it")
    install.add_argument("bundle")
    install.add_argument("--use", action="store_true", help="also make it current")
    install.add_argument("--public-key", help="publisher public key (default: the store's trusted.pub)")
    sub.add_parser("path", help="print where the store lives")
    args = parser.parse_args(argv)
    store = ModelStore(args.home)
    command = args.command or "list"
    if command == "path":
        print(store.home)
        return EXIT_OK
    state = store.state()
    if command == "list":
        versions = store.versions()
        if not versions:
            print(f"no models installed in {store.home}")
        for ref in versions:
            mark = "current" if ref == state.current else "previous" if ref == state.previous else ""
            print(f"{ref.name}  v{ref.version}  {mark}".rstrip())
        return EXIT_OK
    if command == "rollback":
        new = store.rollback()
        print(f"now using {new.current} (was {new.previous})")
        return EXIT_OK
    if command == "use":
        ref = _parse_ref(args.version, state.current, store)
        if ref is None:
            parser.error(f"{args.version!r} is not VERSION or NAME:VERSION")
        from .bundles import load_bundle

        load_bundle(store.path_of(ref), _store_key(store, None))  # never switch to a bad bundle
        new = store.use(ref)
        print(f"now using {new.current}" + (f" (previous: {new.previous})" if new.previous else ""))
        return EXIT_OK
    # install
    from .bundles import load_bundle

    bundle = load_bundle(args.bundle, _store_key(store, args.public_key))
    ref = ModelRef(bundle.name, bundle.version)
    store.install(args.bundle, ref, verify=lambda path: load_bundle(path, _store_key(store, args.public_key)))
    print(f"installed {ref}")
    if args.use:
        store.use(ref)
        print(f"now using {ref}")
    return EXIT_OK


def _store_key(store, explicit: str | None) -> str | Path:  # noqa: ANN001
    return explicit or os.environ.get("EDGE_CLASSIFY_PUBLIC_KEY") or (store.home / "trusted.pub")


def _parse_ref(text: str, current, store):  # noqa: ANN001
    from .store import ModelRef

    name, _, version = text.rpartition(":")
    if not version.lstrip("v").isdigit():
        return None
    if not name:
        names = {r.name for r in store.versions()}
        name = current.name if current is not None else (names.pop() if len(names) == 1 else "")
        if not name:
            return None
    return ModelRef(name, int(version.lstrip("v")))


class _Progress:
    def __init__(self, total: int) -> None:
        self.total, self.count = total, 0

    def step(self) -> None:
        self.count += 1
        if self.count % 10 == 0 or self.count == self.total:
            print(f"\r{self.count}/{self.total} photos", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        print(file=sys.stderr)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
    print(f"edge-classify: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
