"""Tables that tools write into docs: the text between `<!-- NAME: ... -->` and
`<!-- end NAME -->` in a markdown file is replaced (nothing happens without the markers)."""

from __future__ import annotations

from pathlib import Path


def write_between(path: Path, name: str, text: str) -> bool:
    s = path.read_text()
    start, end = f"<!-- {name}:", f"<!-- end {name} -->"
    if start not in s or end not in s:
        return False
    head = s.index("-->", s.index(start)) + 3
    path.write_text(s[:head] + "\n" + text.strip("\n") + "\n" + s[s.index(end):])
    return True
