"""Sizes on the command line: 500MB, 2GB, 1.5GiB, 123456 (bytes).

kB/MB/GB/TB (and k/M/G/T) are powers of 1000, KiB/MiB/GiB/TiB powers of 1024:
the same reading as `mlxmoe plan --nodes 3x64GB` and as macOS reports disk sizes.
"""

from __future__ import annotations

import re

UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
         "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | None, option: str) -> int | None:
    """text -> bytes (None stays None); a ValueError naming `option` otherwise."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?)?b?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{option}: {text!r}: give a size such as 500MB, 2GiB or 123456")
    return int(float(m.group(1)) * UNITS[(m.group(2) or "").lower()])
