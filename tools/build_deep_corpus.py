#!/usr/bin/env python3
"""Build the corpus of mlxmoe's deep reference family (14 domains + 3 unseen kinds).

Like tools/build_corpus.py (whose helpers it reuses), everything comes from files
that Debian packages or the running Python put on the machine; nothing is
downloaded. Debian packages it reads (install them once, as root):

    apt-get install -y fortunes fortunes-min fortunes-de fortunes-es fortunes-it \\
        fortunes-ru fortunes-pl fortunes-cs iso-codes python3.11-doc golang-1.19-src \\
        perl-modules-5.36 manpages

Training domains (one directory each under --out, document i held out iff i % 20 == 19):

    code_python  Python standard library sources (as build_corpus.py's "code")
    code_go      Go standard library sources (golang-1.19-src; *_test.go, testdata excluded)
    code_perl    Perl core modules (perl-modules-5.36, *.pm with their POD)
    code_shell   shell scripts in /usr/bin, /usr/sbin, /usr/lib, /usr/share, /etc (by "#!" line)
    docs_python  the Python documentation's reStructuredText sources (python3.11-doc)
    prose_XX     fortune cookies in en, de, es, it, ru, pl, cs (7 languages; "off" parts excluded)
    structured   iso-codes records as JSON / JSON Lines / CSV + multilingual name tables
    numbers      numeric tables shipped with numpy (random-generator test vectors, ufunc
                 validation sets: hex floats, integers) as CSV

Unseen kinds (never trained on, in no calibration suite; <out>/unseen/<kind>/heldout.txt
and the suite deep-unseen.jsonl):

    man_page     English man pages, roff source (/usr/share/man/man[1-8], manpages & co.)
    markdown     Markdown files (*.md) under /usr/share/doc and the interpreter's site-packages
    c_header     C headers under /usr/include

Outputs: <out>/<domain>/{train,heldout}.txt, <out>/unseen/<kind>/heldout.txt, <out>/MANIFEST.json
(sources, counts, sha256; "unseen" lists the unseen kinds), and under --suites
deep-heldout.jsonl, deep-calibration.jsonl (40 passages per training domain, from held-out
resp. train documents) and deep-unseen.jsonl (40 passages per unseen kind).
Deterministic: sorted file lists, fixed seeds, byte budgets filled in sha256-of-path order.

Usage:  python3 tools/build_deep_corpus.py [--out corpus-deep] [--suites mlxmoe/assets/suites]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_corpus as bc  # noqa: E402

REPO = bc.REPO
PROSE = {"prose_en": ["fortunes", "fortunes-min"], "prose_de": ["fortunes-de"], "prose_es": ["fortunes-es"],
         "prose_it": ["fortunes-it"], "prose_ru": ["fortunes-ru"], "prose_pl": ["fortunes-pl"],
         "prose_cs": ["fortunes-cs"]}
MB = 1_000_000
# byte budget per domain (None: everything); keeps the token cache small enough to carry
BUDGET = {"code_python": 5 * MB, "code_go": 5 * MB, "code_perl": 3 * MB, "code_shell": 2 * MB,
          "docs_python": 4 * MB, "structured": 3 * MB, "numbers": 2 * MB, "prose": 3 * MB}
UNSEEN_BUDGET = 400_000
MAX_FILE = 150_000
DOC_CHUNK = 12_000  # long tables (numbers) are cut into documents of about this size
PACKAGES = sorted({p for v in PROSE.values() for p in v} | {"iso-codes", "python3.11-doc", "golang-1.19-src",
                                                            "perl-modules-5.36", "manpages"})


def read_any(p: Path) -> str:
    if p.suffix == ".gz":
        raw = gzip.open(p).read()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    return bc.read_text(p)


def walk(root: Path, match, skip_dirs=frozenset()) -> list[Path]:
    out = []
    for r, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs)
        out += [Path(r) / n for n in sorted(names) if match(Path(r) / n)]
    return out


def budgeted(paths: list[Path], budget: int | None, header) -> list[str]:
    """Documents from files, a byte budget filled in sha256-of-path order, kept in path order."""
    cand = []
    for p in sorted(set(paths)):
        if p.is_symlink() or not p.is_file() or not 200 <= p.stat().st_size <= MAX_FILE:
            continue
        text = bc.clean_text(read_any(p))
        if bc.SEP in text or len(text) < 200:
            continue
        cand.append((str(p), f"{header(p)}\n{text}" if header else text))
    keep, total = set(), 0
    for key, doc in sorted(cand, key=lambda kd: bc.hashlib.sha256(kd[0].encode()).hexdigest()):
        b = len(doc.encode())
        if budget is None or total + b <= budget:
            keep.add(key)
            total += b
    return [doc for key, doc in cand if key in keep]


def is_shell(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            first = fh.readline(80)
    except OSError:
        return False
    return first.startswith(b"#!") and any(s in first for s in (b"/sh", b"bash", b"dash", b"env sh"))


def code_python():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = bc.CODE_EXCLUDE_DIRS
    paths = [p for p in walk(stdlib, lambda p: p.suffix == ".py", skip) if not any(
        part.startswith("config-") for part in p.parts)]
    return budgeted(paths, BUDGET["code_python"], lambda p: f"# Lib/{p.relative_to(stdlib).as_posix()}"), \
        [{"python": sys.version.split()[0], "stdlib": str(stdlib)}]


def code_go():
    root = Path("/usr/share/go-1.19/src")
    paths = walk(root, lambda p: p.suffix == ".go" and not p.name.endswith("_test.go"), {"testdata", "vendor"})
    return budgeted(paths, BUDGET["code_go"], lambda p: f"// src/{p.relative_to(root).as_posix()}"), \
        [{"package": "golang-1.19-src", "version": bc.dpkg_version("golang-1.19-src")}]


def code_perl():
    root = Path("/usr/share/perl/5.36.0")
    paths = walk(root, lambda p: p.suffix == ".pm")
    return budgeted(paths, BUDGET["code_perl"], lambda p: f"# {p.relative_to(root).as_posix()}"), \
        [{"package": "perl-modules-5.36", "version": bc.dpkg_version("perl-modules-5.36")}]


def code_shell():
    paths = []
    for root in ("/usr/bin", "/usr/sbin", "/usr/lib", "/usr/share", "/etc"):
        paths += walk(Path(root), lambda p: (p.suffix == ".sh" or p.parent.name in ("bin", "sbin"))
                      and p.is_file() and not p.is_symlink() and is_shell(p), {"site-packages", "go-1.19"})
    return budgeted(paths, BUDGET["code_shell"], None), [{"paths": "/usr/{bin,sbin,lib,share}, /etc"}]


def docs_python():
    root = Path("/usr/share/doc/python3.11/html/_sources")
    paths = walk(root, lambda p: p.name.endswith(".rst.txt"))
    return budgeted(paths, BUDGET["docs_python"], None), \
        [{"package": "python3.11-doc", "version": bc.dpkg_version("python3.11-doc")}]


def first_within(docs: list[str], budget: int) -> list[str]:
    """The first documents (in their fixed order) whose bytes fit the budget."""
    keep, total = [], 0
    for d in docs:
        total += len(d.encode())
        if total > budget:
            break
        keep.append(d)
    return keep


def prose(domain: str):
    docs, src = bc.fortune_docs(domain, PROSE[domain])
    return first_within(docs, BUDGET["prose"]), src


def structured():
    docs, src = bc.structured_docs()
    return first_within(docs, BUDGET["structured"]), src


def numbers():
    import numpy
    root = Path(numpy.__file__).parent
    paths = walk(root, lambda p: p.suffix == ".csv")
    docs = []
    for p in sorted(paths):
        text = bc.clean_text(read_any(p))
        head = f"# numpy/{p.relative_to(root).as_posix()}"
        lines, cur = text.split("\n"), []
        for ln in lines:  # documents of ~DOC_CHUNK bytes, each with the file name
            cur.append(ln)
            if sum(len(x) + 1 for x in cur) >= DOC_CHUNK:
                docs.append(head + "\n" + "\n".join(cur))
                cur = []
        if cur:
            docs.append(head + "\n" + "\n".join(cur))
    step = max(1, sum(len(d) for d in docs) // BUDGET["numbers"] + 1)
    return docs[::step], [{"numpy": numpy.__version__, "files": len(paths), "every": step}]


def unseen_man():
    paths = []
    for sec in range(1, 9):
        paths += walk(Path(f"/usr/share/man/man{sec}"), lambda p: p.name.endswith(".gz"))
    return budgeted(paths, UNSEEN_BUDGET, None)


def unseen_markdown():
    site = Path(sysconfig.get_paths()["purelib"])
    paths = walk(Path("/usr/share/doc"), lambda p: p.name.endswith((".md", ".md.gz")))
    paths += walk(site, lambda p: p.suffix == ".md" and "LICENSE" not in p.name.upper())
    return budgeted(paths, UNSEEN_BUDGET, None)


def unseen_c_header():
    return budgeted(walk(Path("/usr/include"), lambda p: p.suffix == ".h"), UNSEEN_BUDGET, None)


BUILDERS = {"code_python": code_python, "code_go": code_go, "code_perl": code_perl, "code_shell": code_shell,
            "docs_python": docs_python, **{d: (lambda d=d: prose(d)) for d in PROSE},
            "structured": structured, "numbers": numbers}
DOMAINS = sorted(BUILDERS)
UNSEEN = {"c_header": unseen_c_header, "man_page": unseen_man, "markdown": unseen_markdown}
MULTI = ("code_", "docs_", "structured", "numbers")  # long documents: several passages each


def passages(domain: str, docs: list[str], tag: str, multi: bool | None = None) -> list[str]:
    multi = domain.startswith(MULTI) if multi is None else multi
    # bc.pick_passages cuts passages anywhere in 'code' documents, at the start of others
    return bc.pick_passages("code" if multi else domain, docs, f"{domain}-{tag}")


def write_split(out: Path, rel: str, docs: list[str]) -> dict:
    p = out / rel
    bc.write_docs(p, docs)
    return {"path": rel, "documents": len(docs), "chars": sum(len(d) for d in docs),
            "bytes": p.stat().st_size, "sha256": bc.sha256_file(p)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "corpus-deep"))
    ap.add_argument("--suites", default=str(REPO / "mlxmoe" / "assets" / "suites"))
    args = ap.parse_args(argv)
    missing = []
    for pkg in PACKAGES:
        try:
            bc.dpkg_version(pkg)
        except bc.MissingSource:
            missing.append(pkg)
    if missing:
        raise bc.MissingSource("build_deep_corpus: missing Debian package(s): " + " ".join(missing) +
                               "\n    apt-get install -y " + " ".join(missing))
    out = Path(args.out)
    for d in DOMAINS + ["unseen"]:
        shutil.rmtree(out / d, ignore_errors=True)
    manifest = {"format": "mlxmoe-corpus/1", "separator": bc.SEP, "seed": bc.SEED,
                "heldout_rule": f"doc_index % {bc.HELDOUT_EVERY} == {bc.HELDOUT_EVERY - 1}",
                "domains": {}, "unseen": {}}
    suites = {"deep-heldout": [], "deep-calibration": [], "deep-unseen": []}
    total = 0
    for domain in DOMAINS:
        docs, sources = BUILDERS[domain]()
        train = [d for i, d in enumerate(docs) if i % bc.HELDOUT_EVERY != bc.HELDOUT_EVERY - 1]
        held = [d for i, d in enumerate(docs) if i % bc.HELDOUT_EVERY == bc.HELDOUT_EVERY - 1]
        files = {s: write_split(out, f"{domain}/{s}.txt", ds) for s, ds in (("train", train), ("heldout", held))}
        total += files["train"]["bytes"] + files["heldout"]["bytes"]
        manifest["domains"][domain] = {"sources": sources, "files": files}
        suites["deep-heldout"] += [{"domain": domain, "text": p} for p in passages(domain, held, "heldout")]
        suites["deep-calibration"] += [{"domain": domain, "text": p} for p in passages(domain, train, "calibration")]
        print(f"{domain:12s} docs={len(docs):6d} train={files['train']['bytes']/MB:6.2f}MB "
              f"heldout={files['heldout']['bytes']/MB:5.2f}MB", file=sys.stderr)
    for kind, build in UNSEEN.items():
        docs = build()
        manifest["unseen"][kind] = {"files": {"heldout": write_split(out, f"unseen/{kind}/heldout.txt", docs)}}
        suites["deep-unseen"] += [{"domain": kind, "text": p} for p in passages(kind, docs, "unseen", multi=True)]
        print(f"unseen {kind:10s} docs={len(docs):5d} {sum(len(d) for d in docs)/MB:5.2f}MB", file=sys.stderr)
    manifest["total_bytes"] = total
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    sd = Path(args.suites)
    sd.mkdir(parents=True, exist_ok=True)
    for name, suite in suites.items():
        with open(sd / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as fh:
            for rec in suite:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        counts = {}
        for r in suite:
            counts[r["domain"]] = counts.get(r["domain"], 0) + 1
        print(f"{name}.jsonl: {len(suite)} passages {counts}", file=sys.stderr)
    print(f"total {total/MB:.2f} MB -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
