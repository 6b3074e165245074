"""Build mlxmoe/assets/suites/unseen.jsonl: kinds of text that are in no
calibration or held-out suite (man pages, Markdown, C headers), taken from the
files of a Debian/Ubuntu machine, to measure masked routing (and healing) on text
it was never tuned on. Every line records its source file.

    python tools/build_unseen_suite.py [--out PATH] [--per-domain 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

MAN = ["ls", "grep", "tar", "find", "sed", "cp", "chmod", "ssh", "curl", "rsync", "make", "gzip", "ps", "kill",
       "date", "sort", "diff", "xargs", "ln", "du"]
MARKDOWN_ROOTS = ["/root/.pyenv", "/root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc", "/usr/share/doc"]
HEADERS = ["stdio.h", "stdlib.h", "string.h", "unistd.h", "signal.h", "pthread.h", "fcntl.h", "time.h", "errno.h",
           "dirent.h", "sched.h", "termios.h", "zlib.h", "netdb.h", "poll.h", "glob.h", "regex.h", "search.h"]
CHARS = (500, 900)  # a passage: whole paragraphs up to about this many characters


def passage(text: str) -> str | None:
    """A chunk of whole paragraphs, CHARS long, from the middle of the text
    (past licence headers and title blocks)."""
    paras = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]
    chunks, cur = [], ""
    for p in paras:
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) >= CHARS[0]:
            chunks.append(cur[: CHARS[1]])
            cur = ""
    return chunks[len(chunks) // 2] if chunks else None


def man_page(name: str) -> str:
    env = {**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0"}
    out = subprocess.run(["man", "-P", "cat", name], capture_output=True, text=True, env=env).stdout
    return subprocess.run(["col", "-b"], input=out, capture_output=True, text=True).stdout


def markdown_files(limit: int) -> list[Path]:
    found = []
    for root in MARKDOWN_ROOTS:
        for p in sorted(Path(root).rglob("*.md")) if Path(root).is_dir() else []:
            if 3000 < p.stat().st_size < 200_000 and "LICENSE" not in p.name and ".partial" not in str(p):
                found.append(p)
    return found[:limit]


def collect(per_domain: int) -> list[dict]:
    rows = []
    sources = {"man_page": [(f"man {n}", lambda n=n: man_page(n)) for n in MAN],
               "markdown": [(str(p), p.read_text) for p in markdown_files(per_domain * 2)],
               "c_header": [(f"/usr/include/{h}", Path(f"/usr/include/{h}").read_text)
                            for h in HEADERS if Path(f"/usr/include/{h}").is_file()]}
    for dom, files in sources.items():
        got = []
        for src, read in files:
            try:
                text = read()
            except (OSError, UnicodeDecodeError):
                continue
            t = passage(text)
            if t:
                got.append({"domain": dom, "text": t, "source": src})
            if len(got) >= per_domain:
                break
        rows += got
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parents[1] / "mlxmoe/assets/suites/unseen.jsonl"))
    ap.add_argument("--per-domain", type=int, default=12)
    a = ap.parse_args()
    rows = collect(a.per_domain)
    Path(a.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    counts = {}
    for r in rows:
        counts[r["domain"]] = counts.get(r["domain"], 0) + 1
    print(f"{a.out}: {counts}")


if __name__ == "__main__":
    main()
