"""Output files: one way to refuse an unwritable path up front and one way to write atomically.

Every command that writes a file (plans, profiles, CSV tables, records, PNG plots) goes through
:func:`atomic_write`, so a failed command never leaves a half-written file, and through
:func:`check_output_path` before doing any work, so a bad path is reported at once.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Optional, Sequence

from lrcnn.errors import LrcnnError, UsageError

__all__ = ["atomic_write", "write_text_atomic", "write_csv_atomic", "write_json_atomic", "read_table", "check_output_path",
           "check_input_file", "OutputError"]


class OutputError(LrcnnError, OSError):
    """A file could not be written; the message names it, the cause and the fix (one line)."""


def check_output_path(path: Optional[str], what: str, suffixes: Sequence[str] = ()) -> None:
    """Refuse an output path that cannot be written, or whose name does not end in one of
    ``suffixes`` (the format is chosen by it), before any work (:class:`~lrcnn.errors.UsageError`,
    a ``ValueError``, one line).  The one output-path check of the project."""
    if path is None:
        return
    if not str(path).strip():
        raise UsageError(f"the {what} path is empty: give a file name")
    if suffixes and not str(path).lower().endswith(tuple(suffixes)):
        raise UsageError(f"cannot write {what} {path!r}: it is written as {' or '.join(suffixes)}; end the name "
                         f"with {'one of those' if len(suffixes) > 1 else suffixes[0]}")
    if os.path.isdir(path):
        raise UsageError(f"cannot write {what} {path!r}: it is a folder; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {what} {path!r}: folder {folder!r} does not exist; create it or "
                         f"choose another path")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"cannot write {what} {path!r}: permission denied; choose a writable path")


def check_input_file(path, what: str, fix: str, error: type = UsageError) -> None:
    """Refuse an input path that is not a readable file, saying which: it does not exist, it is a
    folder, or it cannot be read (``error``, one line: ``what`` it should be and ``fix``).  The one
    input-path check of the project (a folder is not reported as missing)."""
    path = os.fspath(path)
    if not str(path).strip():
        raise error(f"the {what} path is empty: {fix}")
    if os.path.isdir(path):
        raise error(f"{what} {path!r} is a folder, not a file; {fix}")
    if not os.path.exists(path):
        raise error(f"{what} {path!r} does not exist; {fix}")
    if not os.access(path, os.R_OK):
        raise error(f"cannot read {what} {path!r}: permission denied; {fix}")


def atomic_write(path: str, what: str, write: Callable[[str], object], suffix: str = "") -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path``.

    The file at ``path`` is either complete and new or untouched.  An ``OSError`` becomes a
    :class:`OutputError` (still an ``OSError``) whose one-line message names ``what``, the path,
    the cause and the fix.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
        os.close(fd)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a written file gets the usual mode
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputError(f"cannot write {what} {path!r}: {e.strerror or e}; choose a writable file path") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(text: str, path: str, what: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, what, write, os.path.splitext(path)[1])


def read_table(path: str, required, what: str, fix: str, error: type = UsageError):
    """A CSV (or, by extension, Parquet) file this project wrote, as a DataFrame.  A file that
    cannot be read, or lacks a ``required`` column, raises ``error`` with one line: ``what`` the
    file should be and ``fix``."""
    import pandas as pd

    try:
        df = pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path)
    except UnicodeDecodeError:  # a binary file, or text in another encoding
        raise error(f"cannot read {what} {path!r}: not UTF-8 text; {fix}") from None
    except Exception as e:  # pandas/pyarrow raise many types for an empty, binary or truncated file
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise error(f"cannot read {what} {path!r} ({msg}); {fix}") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise error(f"{path!r} is not a {what} (missing column(s) {', '.join(missing)}); {fix}")
    return df


def write_csv_atomic(df, path: str) -> None:
    """Write a DataFrame as CSV atomically: the file at ``path`` is either the complete new CSV
    or untouched (:func:`atomic_write`)."""
    atomic_write(path, "CSV", lambda tmp: df.to_csv(tmp, index=False), ".csv")


def write_json_atomic(data, path: str, what: str = "plan") -> None:
    """Write ``data`` as indented JSON to ``path``, atomically (:func:`atomic_write`)."""
    def write(tmp):
        with open(tmp, "w") as f:  # streamed: a failure while writing leaves no file behind
            json.dump(data, f, indent=2)
            f.write("\n")

    atomic_write(path, what, write, ".json")
