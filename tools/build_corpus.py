#!/usr/bin/env python3
"""Build the labelled training corpus for mlxmoe's reference MoE model.

Everything comes from files that Debian packages (or the running Python
interpreter) put on the machine -- nothing is downloaded from the web.

Debian packages it reads (install them once, as root):

    apt-get update
    apt-get install -y fortunes fortunes-min fortunes-de fortunes-es fortunes-it iso-codes

Python packages: none beyond the standard library (Python >= 3.11).

Domains (one directory each under --out):

    code        Python standard library sources of the running interpreter
                (sysconfig "stdlib" dir; tests, generated tables excluded)
    prose_en    English fortune cookies   (fortunes, fortunes-min)
    prose_de    German fortune cookies    (fortunes-de)
    prose_es    Spanish fortune cookies   (fortunes-es; the offensive "off" part excluded)
    prose_it    Italian fortune cookies   (fortunes-it)
    structured  records of the iso-codes JSON databases (ISO 639, 3166, 4217,
                15924), serialised deterministically as pretty JSON, JSON Lines
                and CSV, plus multilingual name tables built from iso-codes'
                own gettext catalogues (de/es/it/fr)

Outputs:

    <out>/<domain>/train.txt, <out>/<domain>/heldout.txt
        documents separated by a line "<|endoftext|>"; document i (0-based, in a
        fixed sorted order) is held out iff i % 20 == 19.
    <out>/MANIFEST.json
        sources (package versions, interpreter version), document/char/byte
        counts and sha256 of every output file.
    mlxmoe/assets/suites/heldout.jsonl       ~40 passages/domain from held-out docs
    mlxmoe/assets/suites/calibration.jsonl   ~40 passages/domain from train docs
        one {"domain": ..., "text": ...} object per line, 200-400 characters.

The output is a pure function of the installed package versions and the
interpreter's stdlib: same bytes on every run (sorted file lists, fixed seeds).

Usage:  python3 tools/build_corpus.py [--out corpus] [--suites mlxmoe/assets/suites]
"""

from __future__ import annotations

import argparse
import csv
import gettext
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SEP = "<|endoftext|>"
HELDOUT_EVERY = 20
SEED = 20240607
REPO = Path(__file__).resolve().parent.parent

FORTUNE_PACKAGES = {
    "prose_en": ["fortunes", "fortunes-min"],
    "prose_de": ["fortunes-de"],
    "prose_es": ["fortunes-es"],
    "prose_it": ["fortunes-it"],
}
# fortune files that are pictures rather than prose
FORTUNE_SKIP_NAMES = {"ascii-art", "asciiart", "banner"}
ISO_JSON_DIR = Path("/usr/share/iso-codes/json")
LOCALE_DIR = Path("/usr/share/locale")
NAME_LANGS = ["de", "es", "fr", "it"]

CODE_EXCLUDE_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
    "pydoc_data", "encodings", "turtledemo", "ensurepip", "lib2to3", "config-3.11-x86_64-linux-gnu",
}
CODE_MAX_FILE_BYTES = 150_000
CODE_BUDGET_BYTES = 9_000_000

DOMAINS = ["code", "prose_en", "prose_de", "prose_es", "prose_it", "structured"]
PASSAGES_PER_DOMAIN = 40
PASSAGE_MIN, PASSAGE_MAX = 200, 400


class MissingSource(SystemExit):
    pass


def die_missing(package: str, what: str) -> None:
    raise MissingSource(
        f"build_corpus: {what} not found -- install the Debian package '{package}':\n"
        f"    apt-get update && apt-get install -y {package}"
    )


def dpkg_version(pkg: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}\t${Version}", pkg],
            capture_output=True, text=True, check=False,
        )
    except FileNotFoundError:
        raise MissingSource("build_corpus: dpkg-query not found; this tool needs a Debian/Ubuntu system")
    if out.returncode != 0 or "install ok installed" not in out.stdout:
        die_missing(pkg, f"package {pkg}")
    return out.stdout.split("\t", 1)[1].strip()


def dpkg_files(pkg: str) -> list[str]:
    out = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        die_missing(pkg, f"file list of package {pkg}")
    return sorted(set(out.stdout.split("\n")) - {""})


_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(s: str) -> str:
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    # overstriking (x\bx, _\bx) used for bold/underline in old fortune files
    while "\b" in s:
        s2 = re.sub(r"[^\n]\x08", "", s)
        if s2 == s:
            break
        s = s2
    s = s.replace("\t", "    ")
    s = _CTRL.sub("", s)
    s = "\n".join(line.rstrip() for line in s.split("\n"))
    return s.strip("\n")


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# ---------------------------------------------------------------- prose


def fortune_docs(domain: str, packages: list[str] | None = None) -> tuple[list[str], list[dict]]:
    files: dict[str, Path] = {}
    sources = []
    packages = packages or FORTUNE_PACKAGES[domain]
    for pkg in packages:
        ver = dpkg_version(pkg)
        n = 0
        for f in dpkg_files(pkg):
            p = Path(f)
            if "/games/fortunes" not in f or p.suffix in (".dat", ".u8"):
                continue
            if p.is_symlink() or not p.is_file():
                continue
            if "off" in p.parts or p.name in FORTUNE_SKIP_NAMES:
                continue
            files[str(p)] = p
            n += 1
        sources.append({"package": pkg, "version": ver, "files": n})
    if not files:
        die_missing(packages[0], f"fortune files for {domain}")
    docs, seen = [], set()
    for key in sorted(files):
        text = read_text(files[key]).replace("\r\n", "\n")
        for chunk in re.split(r"(?m)^%\s*$", text):
            doc = clean_text(chunk)
            if len(doc) < 20 or doc in seen or SEP in doc:
                continue
            seen.add(doc)
            docs.append(doc)
    return docs, sources


# ---------------------------------------------------------------- code


def code_docs() -> tuple[list[str], list[dict]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not (stdlib / "os.py").is_file():
        raise MissingSource(f"build_corpus: Python stdlib sources not found under {stdlib} "
                            "(on Debian: apt-get install -y libpython3-stdlib python3)")
    rels = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in CODE_EXCLUDE_DIRS and not d.startswith("config-"))
        for n in sorted(names):
            if n.endswith(".py"):
                rels.append((Path(root) / n).relative_to(stdlib).as_posix())
    rels.sort()
    candidates = []
    for rel in rels:
        p = stdlib / rel
        if p.stat().st_size > CODE_MAX_FILE_BYTES or p.stat().st_size < 200:
            continue
        text = clean_text(read_text(p))
        if SEP in text:
            continue
        candidates.append((rel, f"# Lib/{rel}\n{text}"))
    # deterministic subset under the byte budget: order by hash of the path
    by_hash = sorted(candidates, key=lambda rt: hashlib.sha256(rt[0].encode()).hexdigest())
    keep, total = set(), 0
    for rel, doc in by_hash:
        b = len(doc.encode())
        if total + b > CODE_BUDGET_BYTES:
            continue
        keep.add(rel)
        total += b
    docs = [doc for rel, doc in candidates if rel in keep]
    src = [{"python": sys.version.split()[0], "stdlib": str(stdlib),
            "files_considered": len(candidates), "files_used": len(docs)}]
    return docs, src


# ---------------------------------------------------------------- structured


def _csv_text(rows: list[dict]) -> str:
    keys = sorted({k for r in rows for k in r})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in keys})
    return buf.getvalue()


def _render(name: str, rows: list[dict], fmt: int) -> str:
    if fmt == 0:
        return json.dumps({name: rows}, ensure_ascii=False, indent=2, sort_keys=True)
    if fmt == 1:
        return "\n".join(json.dumps(r, ensure_ascii=False, sort_keys=True) for r in rows)
    return _csv_text(rows).rstrip("\n")


def structured_docs() -> tuple[list[str], list[dict]]:
    ver = dpkg_version("iso-codes")
    if not ISO_JSON_DIR.is_dir():
        die_missing("iso-codes", str(ISO_JSON_DIR))
    docs = []
    chunk = 12
    fmt_counter = 0
    tables = {}
    for path in sorted(ISO_JSON_DIR.glob("iso_*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        (key, rows), = data.items()
        tables[path.stem] = rows
        for i in range(0, len(rows), chunk):
            docs.append(_render(key, rows[i:i + chunk], fmt_counter % 3))
            fmt_counter += 1
    # multilingual name tables from iso-codes' own translations
    trans_sources = []
    for domain_name, id_key in (("iso_3166-1", "alpha_2"), ("iso_639-2", "alpha_3"),
                                ("iso_4217", "alpha_3"), ("iso_15924", "alpha_4"),
                                ("iso_639-3", "alpha_3"), ("iso_3166-2", "code")):
        rows = tables.get(domain_name)
        if not rows:
            continue
        cats = {}
        for lang in NAME_LANGS:
            mo = LOCALE_DIR / lang / "LC_MESSAGES" / f"{domain_name}.mo"
            if mo.is_file():
                with open(mo, "rb") as fh:
                    cats[lang] = gettext.GNUTranslations(fh)
        if not cats:
            continue
        trans_sources.append({"catalogue": domain_name, "languages": sorted(cats)})
        out_rows = []
        for r in rows:
            names = {"en": r["name"]}
            for lang, cat in sorted(cats.items()):
                names[lang] = cat.gettext(r["name"])
            out_rows.append({id_key: r[id_key], "names": names})
        for i in range(0, len(out_rows), chunk):
            part = out_rows[i:i + chunk]
            if fmt_counter % 2 == 0:
                docs.append(json.dumps({f"{domain_name}_names": part}, ensure_ascii=False, indent=2,
                                       sort_keys=True))
            else:
                flat = [{id_key: p[id_key], **{f"name_{k}": v for k, v in p["names"].items()}} for p in part]
                docs.append(_csv_text(flat).rstrip("\n"))
            fmt_counter += 1
    return docs, [{"package": "iso-codes", "version": ver, "tables": sorted(tables),
                   "translations": trans_sources}]


# ---------------------------------------------------------------- passages


def cut_passage(doc: str, rng: random.Random, any_start: bool) -> str | None:
    lines = doc.split("\n")
    starts = list(range(len(lines))) if any_start else [0]
    if any_start:
        starts = [i for i in starts if lines[i].strip()]
        rng.shuffle(starts)
        starts = starts[:8]
    for s in starts:
        out = ""
        for line in lines[s:]:
            cand = line if not out else out + "\n" + line
            if len(cand) > PASSAGE_MAX:
                if not out:  # a single long line: cut at a space
                    cut = line[:PASSAGE_MAX].rsplit(" ", 1)[0]
                    out = cut
                break
            out = cand
        out = out.strip("\n")
        if PASSAGE_MIN <= len(out) <= PASSAGE_MAX:
            return out
    return None


def pick_passages(domain: str, docs: list[str], seed_tag: str) -> list[str]:
    rng = random.Random(f"{SEED}-{domain}-{seed_tag}")
    order = list(range(len(docs)))
    rng.shuffle(order)
    out: list[str] = []
    seen: set[str] = set()
    multi = domain in ("code", "structured")  # long documents: several passages each
    for _round in range(8 if multi else 1):
        for i in order:
            p = cut_passage(docs[i], rng, any_start=multi)
            if p is not None and p not in seen:
                seen.add(p)
                out.append(p)
            if len(out) == PASSAGES_PER_DOMAIN:
                return out
    # short documents (e.g. one-line proverbs): join consecutive ones
    buf = ""
    for i in order:
        d = docs[i]
        if len(d) > PASSAGE_MAX:
            continue
        buf = d if not buf else buf + "\n\n" + d
        if len(buf) > PASSAGE_MAX:
            buf = d
        if len(buf) >= PASSAGE_MIN and buf not in seen:
            seen.add(buf)
            out.append(buf)
            buf = ""
            if len(out) == PASSAGES_PER_DOMAIN:
                break
    return out


# ---------------------------------------------------------------- main


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_docs(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(("\n" + SEP + "\n").join(docs))
        fh.write("\n")


def read_docs(path: Path) -> list[str]:
    """Inverse of write_docs (used by tools/train_reference_moe.py)."""
    text = path.read_text(encoding="utf-8")
    if text.endswith("\n"):
        text = text[:-1]
    return [d for d in text.split("\n" + SEP + "\n") if d]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "corpus"), help="corpus output dir (default: <repo>/corpus)")
    ap.add_argument("--suites", default=str(REPO / "mlxmoe" / "assets" / "suites"),
                    help="where heldout.jsonl / calibration.jsonl go")
    ap.add_argument("--no-suites", action="store_true", help="do not (re)write the prompt suites")
    args = ap.parse_args(argv)

    out = Path(args.out)
    builders = {
        "code": code_docs,
        "prose_en": lambda: fortune_docs("prose_en"),
        "prose_de": lambda: fortune_docs("prose_de"),
        "prose_es": lambda: fortune_docs("prose_es"),
        "prose_it": lambda: fortune_docs("prose_it"),
        "structured": structured_docs,
    }
    # fail early, naming every missing package at once
    missing = []
    for pkgs in list(FORTUNE_PACKAGES.values()) + [["iso-codes"]]:
        for pkg in pkgs:
            try:
                dpkg_version(pkg)
            except MissingSource:
                missing.append(pkg)
    if missing:
        raise MissingSource("build_corpus: missing Debian package(s): " + " ".join(missing) +
                            "\n    apt-get update && apt-get install -y " + " ".join(missing))

    if out.exists():
        for d in DOMAINS:
            shutil.rmtree(out / d, ignore_errors=True)
    manifest = {"format": "mlxmoe-corpus/1", "separator": SEP, "heldout_rule": f"doc_index % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1}",
                "seed": SEED, "domains": {}}
    heldout_suite, calib_suite = [], []
    total = 0
    for domain in DOMAINS:
        docs, sources = builders[domain]()
        train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
        held = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
        files = {}
        for split, ds in (("train", train), ("heldout", held)):
            p = out / domain / f"{split}.txt"
            write_docs(p, ds)
            size = p.stat().st_size
            total += size
            files[split] = {"path": f"{domain}/{split}.txt", "documents": len(ds),
                            "chars": sum(len(d) for d in ds), "bytes": size, "sha256": sha256_file(p)}
        manifest["domains"][domain] = {"sources": sources, "files": files}
        for p in pick_passages(domain, held, "heldout"):
            heldout_suite.append({"domain": domain, "text": p})
        for p in pick_passages(domain, train, "calibration"):
            calib_suite.append({"domain": domain, "text": p})
        print(f"{domain:11s} docs={len(docs):6d} train={files['train']['bytes']/1e6:6.2f}MB "
              f"heldout={files['heldout']['bytes']/1e6:5.2f}MB", file=sys.stderr)
    manifest["total_bytes"] = total
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"total {total/1e6:.2f} MB -> {out}", file=sys.stderr)

    if not args.no_suites:
        sd = Path(args.suites)
        sd.mkdir(parents=True, exist_ok=True)
        for name, suite in (("heldout.jsonl", heldout_suite), ("calibration.jsonl", calib_suite)):
            with open(sd / name, "w", encoding="utf-8", newline="\n") as fh:
                for rec in suite:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            counts = {d: sum(1 for r in suite if r["domain"] == d) for d in DOMAINS}
            print(f"{name}: {len(suite)} passages {counts}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
