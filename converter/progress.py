"""Progress bars for calibration and validation (tqdm on a terminal, nothing elsewhere), and a quiet stderr.

TensorFlow's C++ code logs straight to file descriptor 2, so a tidy command line captures that
descriptor while it works, and draws its progress bars on a duplicate of the real stderr. The capture
is process-wide: it suits command lines and batch jobs, not a server with other threads writing logs.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from typing import IO, Iterable, Iterator, TypeVar

T = TypeVar("T")


def stderr_is_terminal() -> bool:
    """True when stderr is an interactive terminal (where a progress bar helps rather than clutters)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress(
    items: Iterable[T], *, total: int | None, desc: str, enabled: bool, file: IO[str] | None = None
) -> Iterator[T]:
    """`items`, with a tqdm bar on `file` (default stderr) when `enabled`."""
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, total=total, desc=desc, unit="photo", leave=False, file=file or sys.stderr,
              dynamic_ncols=True) as bar:
        yield from bar


@contextlib.contextmanager
def native_log_captured() -> Iterator[tuple[io.StringIO, IO[str] | None]]:
    """Send fd 2 (where TensorFlow's C++ code logs) to a buffer; yield it and a stream to the real stderr.

    The real-stderr stream is for progress bars, which must still reach the terminal.
    """
    log = io.StringIO()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to capture
        yield log, None
        return
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield log, terminal
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            terminal.close()
            sink.seek(0)
            log.write(sink.read().decode("utf-8", "replace"))
