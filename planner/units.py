"""Byte sizes: parsing ("8GB", "8GiB", "512MiB", "1.5e9") and printing, one implementation."""
from __future__ import annotations

import re
from typing import Optional, Sequence

from lrcnn.errors import UsageError

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


MAX_BYTES = 10**15  # a size above a petabyte is a typo, not a device


def parse_bytes(text) -> int:
    """Bytes from a size: an int, or a string with unit B, KB, MB, GB, TB (powers of 1000) or
    KiB, MiB, GiB, TiB (powers of 1024).  Raises :class:`~lrcnn.errors.UsageError` (a ``ValueError``)
    with a one-line reason."""
    if isinstance(text, bool):
        raise UsageError(f"size {text!r} is not a number of bytes; give one, e.g. 8GB")
    if isinstance(text, (int, float)):
        if text <= 0:
            raise UsageError(f"size must be positive, got {text}; give a size such as 8GB")
        return int(text)
    m = _RE.match(str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise UsageError(f"cannot read size {text!r}: use a number with B, KB, MB, GB, TB, KiB, MiB, GiB or TiB (e.g. 8GB, 7.5GiB)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise UsageError(f"size must be positive, got {text!r}; give a size such as 8GB")
    if value < 1:
        raise UsageError(f"size {text!r} is less than one byte: give a unit (e.g. 8GB, 512MiB)")
    if value > MAX_BYTES:
        raise UsageError(f"size {text!r} is beyond any device ({MAX_BYTES // 10**15} PB): check the unit (e.g. 8GB)")
    return int(round(value))


def _sig3(n: float, units) -> str:
    """``n`` bytes in the largest of ``units`` ((name, scale), largest first) it reaches, with three
    significant digits: 8.00 GB, 12.3 MB, 778 kB, 512 B."""
    for unit, scale in units:
        x = n / scale
        if abs(x) >= 1 or scale == 1:
            if scale == 1:
                return f"{int(round(n))} B"
            digits = 0 if abs(x) >= 99.95 else 1 if abs(x) >= 9.995 else 2
            return f"{x:.{digits}f} {unit}"
    return f"{int(round(n))} B"


_BINARY = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
_DECIMAL = (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3), ("B", 1))


def binary_unit(n: float, smallest: str = "B"):
    """``(name, bytes)`` of the largest binary unit ``n`` bytes reach, at least ``smallest``
    (an axis in KiB / MiB / GiB; the same units :func:`fmt_bytes` prints)."""
    names = [name for name, _ in _BINARY]
    for name, scale in _BINARY[:names.index(smallest)]:
        if abs(n) >= scale:
            return name, scale
    return smallest, dict(_BINARY)[smallest]


def fmt_bytes(n: float) -> str:
    """Human form in binary units, three significant digits: '1.23 GiB', '759 KiB'."""
    return _sig3(float(n), _BINARY)


def fmt_both(n: float) -> str:
    """Both forms, three significant digits each: '8.00 GB (7.45 GiB)', '778 kB (759 KiB)'."""
    return f"{_sig3(float(n), _DECIMAL)} ({_sig3(float(n), _BINARY)})"


def format_table(header: Sequence[str], rows: Sequence[Sequence], align: Optional[str] = None) -> str:
    """Aligned plain-text table.  ``align``: one of ``l``/``r`` per column (default: numbers
    right-aligned, text left-aligned, judged from the first row)."""
    cells = [[str(c) for c in r] for r in rows]
    head = [str(h) for h in header]
    if align is None:
        first = rows[0] if rows else [""] * len(head)
        align = "".join("r" if isinstance(v, (int, float)) and not isinstance(v, bool) else "l" for v in first)
    widths = [max([len(head[i])] + [len(r[i]) for r in cells]) for i in range(len(head))]

    def line(vals):
        out = [v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(vals, widths, align)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule] + [line(r) for r in cells])
