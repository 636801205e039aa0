"""Build the four-domain corpus that the embedded default model is trained and measured on.

Domains and where their raw text comes from (nothing needs the network but `apt-get download`
from the Debian mirror; the versions below are the ones the shipped model was built from):

- ``code``: the CPython standard library ``.py`` sources of the running interpreter
  (``sysconfig.get_paths()["stdlib"]``; CPython 3.11.7 for the shipped model), without the
  test suites (``test/``, ``tests/``, ``idle_test/``), site-packages, the generated codec tables
  under ``encodings/`` and ``pydoc_data/topics.py`` (which is documentation text in a string).
- ``docs``: the reStructuredText sources of the Python documentation, Debian package
  ``python3.11-doc`` (3.11.2-6+deb12u9), ``usr/share/doc/python3.11/html/_sources/**/*.rst.txt``.
- ``quotes``: Debian packages ``fortunes`` and ``fortunes-min`` (1:1.99.1-7.3),
  ``usr/share/games/fortunes/*`` (the ``%``-separated files; ``ascii-art`` and ``translate-me``
  left out), overstrike sequences removed, exact duplicates dropped.
- ``dictionary``: Debian package ``dict-gcide`` (0.48.5+nmu2), the Collaborative International
  Dictionary of English in dictd format: ``gcide.index`` gives each headword's offset and length
  (base64) in the gzip-compressed ``gcide.dict.dz``; every distinct entry is taken once, in file
  order, without the ``00-database-*`` header entries.

Each domain's text is cut into documents of 0.7-1.4 KB at paragraph (blank-line) boundaries,
grouped by origin (a source file for code and docs; for quotes and dictionary every document is
its own group, after de-duplicating quotes and entries). A seeded shuffle of the groups picks
held-out groups for ``profile`` and ``eval`` (at most ``--per-group`` documents taken from each;
the rest of a held-out group is discarded, so no document of a held-out source file is ever
trained on); every other group goes to ``train``. The splits are disjoint by group and by text.

Outputs, under ``--out`` (default ``build/default-data``, not shipped):
- ``train/{domain}.jsonl``: ``{"text": ...}`` per line;
- ``heldout/{domain}.{profile,eval}.jsonl``: held-out candidates (``{"text", "group"}``), in
  the seeded order; ``scripts/train_default_model.py`` ships the first 150 of each that fit the
  model's 512-token window (that needs its tokenizer) into ``mfprune/default_model/data``;
- ``manifest.json``: sources, sizes, the source files of the training texts.

Re-running with the same arguments (and the same package versions and CPython) gives
byte-identical files. The ``.deb`` files are cached in ``<out>/debs``: ``apt-get download`` (run
``apt-get update`` once on a fresh machine) is called only for a missing one.

    python scripts/prepare_default_data.py            # ~10 s after the downloads (28 MB)
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("code", "docs", "quotes", "dictionary")
PACKAGES = ("python3.11-doc", "fortunes", "fortunes-min", "dict-gcide")
SEED = 20240611
MIN_CHARS, MAX_CHARS = 700, 1400  # ~200-500 tokens: every text fits the 512-token window

CODE_EXCLUDE_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings"}
CODE_EXCLUDE_FILES = {"pydoc_data/topics.py"}
FORTUNE_EXCLUDE = {"ascii-art", "translate-me"}


# ---------------------------------------------------------------------------------------------
# raw data


def fetch_debs(cache: Path) -> dict[str, Path]:
    """Download (once) and unpack the Debian packages; returns package name -> unpacked root."""
    cache.mkdir(parents=True, exist_ok=True)
    roots = {}
    for pkg in PACKAGES:
        debs = sorted(cache.glob(f"{pkg}_*.deb"))
        if not debs:
            print(f"apt-get download {pkg}", flush=True)
            subprocess.run(["apt-get", "download", pkg], cwd=cache, check=True)
            debs = sorted(cache.glob(f"{pkg}_*.deb"))
        if not debs:
            sys.exit(f"apt-get download {pkg} left no .deb in {cache}")
        root = cache / "unpacked" / pkg
        if not root.exists():
            tmp = root.with_suffix(".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            subprocess.run(["dpkg", "-x", str(debs[-1]), str(tmp)], check=True)
            tmp.rename(root)
        roots[pkg] = root
    return roots


def deb_version(cache: Path, pkg: str) -> str:
    deb = sorted(cache.glob(f"{pkg}_*.deb"))[-1]
    return deb.name.split("_")[1].replace("%3a", ":")


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def read_code() -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if set(rel.split("/")[:-1]) & CODE_EXCLUDE_DIRS or rel in CODE_EXCLUDE_FILES:
            continue
        text = clean(path.read_text(encoding="utf-8", errors="replace"))
        if text:
            out.append((rel, text))
    return out


def read_docs(root: Path) -> list[tuple[str, str]]:
    src = root / "usr/share/doc/python3.11/html/_sources"
    out = []
    for path in sorted(src.rglob("*.rst.txt")):
        text = clean(path.read_text(encoding="utf-8", errors="replace"))
        if text:
            out.append((path.relative_to(src).as_posix(), text))
    return out


def read_quotes(roots: list[Path]) -> list[tuple[str, str]]:
    files: dict[str, Path] = {}
    for root in roots:
        for path in (root / "usr/share/games/fortunes").glob("*"):
            if path.is_file() and not path.is_symlink() and path.suffix not in {".dat", ".u8"}:
                files.setdefault(path.name, path)
    seen, out = set(), []
    for name in sorted(files):
        if name in FORTUNE_EXCLUDE:
            continue
        raw = files[name].read_text(encoding="utf-8", errors="replace")
        raw = re.sub(r".\x08", "", raw)  # overstrike (x BS x, _ BS x)
        for i, quote in enumerate(re.split(r"\n%\n", raw)):
            quote = clean(quote.removesuffix("%"))
            key = " ".join(quote.split())
            if quote and key not in seen:
                seen.add(key)
                out.append((f"{name}:{i}", quote))
    return out


def _b64(s: str) -> int:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for c in s:
        value = value * 64 + alphabet.index(c)
    return value


def read_dictionary(root: Path) -> list[tuple[str, str]]:
    base = root / "usr/share/dictd"
    data = gzip.decompress((base / "gcide.dict.dz").read_bytes())
    spans = set()
    for line in (base / "gcide.index").read_text(encoding="utf-8").splitlines():
        word, off, length = line.split("\t")[:3]
        if not word.startswith("00-"):
            spans.add((_b64(off), _b64(length)))
    seen, out = set(), []
    for off, length in sorted(spans):
        entry = clean(data[off : off + length].decode("utf-8", errors="replace"))
        if entry and entry not in seen:
            seen.add(entry)
            out.append((f"@{off}", entry))
    return out


# ---------------------------------------------------------------------------------------------
# documents and splits


def _split_long(par: str) -> list[str]:
    """Cut a paragraph longer than MAX_CHARS at line boundaries (then hard, for huge lines)."""
    pieces, cur = [], ""
    for line in par.split("\n"):
        while len(line) > MAX_CHARS:
            pieces.append(line[:MAX_CHARS])
            line = line[MAX_CHARS:]
        if cur and len(cur) + 1 + len(line) > MAX_CHARS:
            pieces.append(cur)
            cur = line
        else:
            cur = f"{cur}\n{line}" if cur else line
    if cur:
        pieces.append(cur)
    return pieces


def chunk(paragraphs: list[str], sep: str = "\n\n") -> list[str]:
    """Pack paragraphs, in order, into documents of MIN_CHARS..MAX_CHARS characters (the last
    one of a source may be shorter; one under MIN_CHARS / 4 is merged into its predecessor if
    that fits, or dropped)."""
    parts = [p for par in paragraphs for p in _split_long(par)]
    docs, cur = [], ""
    for p in parts:
        if cur and len(cur) + len(sep) + len(p) > MAX_CHARS:
            docs.append(cur)
            cur = p
        else:
            cur = f"{cur}{sep}{p}" if cur else p
        if len(cur) >= MIN_CHARS:
            docs.append(cur)
            cur = ""
    if cur:
        if len(cur) >= MIN_CHARS // 4:
            docs.append(cur)
        elif docs and len(docs[-1]) + len(sep) + len(cur) <= MAX_CHARS:
            docs[-1] = f"{docs[-1]}{sep}{cur}"
    return docs


def build_groups(domain: str, items: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """(group id, documents) for one domain."""
    if domain in ("code", "docs"):
        return [(name, chunk(text.split("\n\n"))) for name, text in items]
    # quotes / dictionary: pack consecutive items; every document is its own group
    sep = "\n%\n" if domain == "quotes" else "\n\n"
    docs = chunk([text for _, text in items], sep=sep)
    return [(f"{domain}:{i}", [d]) for i, d in enumerate(docs)]


def split_domain(
    domain: str, groups: list[tuple[str, list[str]]], n_heldout: int, per_group: int
) -> dict[str, list[tuple[str, str]]]:
    rng = random.Random(f"{SEED}:{domain}")
    order = list(range(len(groups)))
    rng.shuffle(order)
    splits: dict[str, list[tuple[str, str]]] = {"profile": [], "eval": [], "train": []}
    held_texts: set[str] = set()
    turn = 0  # alternate held-out groups between profile and eval
    for gi in order:
        gid, docs = groups[gi]
        docs = [d for d in docs if d.strip()]
        if not docs:
            continue
        want = [s for s in ("profile", "eval") if len(splits[s]) < n_heldout]
        if want:
            name = want[turn % len(want)]
            turn += 1
            picks = sorted(rng.sample(range(len(docs)), min(per_group, len(docs))))
            for k in picks[: n_heldout - len(splits[name])]:
                splits[name].append((f"{gid}#{k}" if len(docs) > 1 else gid, docs[k]))
                held_texts.add(docs[k])
        else:
            splits["train"].extend((gid, d) for d in docs if d not in held_texts)
    return splits


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build/default-data")
    ap.add_argument(
        "--candidates", type=int, default=170, help="held-out candidates per domain and split"
    )
    ap.add_argument("--per-group", type=int, default=3, help="held-out texts taken per group")
    args = ap.parse_args()

    cache = args.out / "debs"
    roots = fetch_debs(cache)
    raw = {
        "code": read_code(),
        "docs": read_docs(roots["python3.11-doc"]),
        "quotes": read_quotes([roots["fortunes"], roots["fortunes-min"]]),
        "dictionary": read_dictionary(roots["dict-gcide"]),
    }
    manifest = {
        "seed": SEED,
        "doc_chars": [MIN_CHARS, MAX_CHARS],
        "sources": {
            "code": f"CPython {sys.version.split()[0]} standard library .py sources "
            "(sysconfig stdlib; no test suites, site-packages, encodings/, pydoc_data/topics.py)",
            "docs": f"Debian python3.11-doc {deb_version(cache, 'python3.11-doc')}: "
            "html/_sources/**/*.rst.txt",
            "quotes": f"Debian fortunes + fortunes-min {deb_version(cache, 'fortunes')}: "
            "usr/share/games/fortunes/* (not ascii-art, translate-me), de-duplicated",
            "dictionary": f"Debian dict-gcide {deb_version(cache, 'dict-gcide')}: "
            "gcide.dict.dz entries via gcide.index, de-duplicated",
        },
        "domains": {},
    }
    for domain in DOMAINS:
        groups = build_groups(domain, raw[domain])
        splits = split_domain(domain, groups, args.candidates, args.per_group)
        texts = {s: [t for _, t in v] for s, v in splits.items()}
        origin = {s: {g.split("#")[0] for g, _ in v} for s, v in splits.items()}
        # disjoint by text and by origin (the source file, for code and docs)
        for a, b in (("profile", "eval"), ("profile", "train"), ("eval", "train")):
            assert not set(texts[a]) & set(texts[b]), (domain, a, b)
            assert not origin[a] & origin[b], (domain, a, b, sorted(origin[a] & origin[b])[:5])
        for s in ("profile", "eval"):
            assert len(texts[s]) == args.candidates, (domain, s, len(texts[s]))
            write_jsonl(
                args.out / "heldout" / f"{domain}.{s}.jsonl",
                [{"text": t, "group": g} for g, t in splits[s]],
            )
        write_jsonl(args.out / "train" / f"{domain}.jsonl", [{"text": t} for t in texts["train"]])
        manifest["domains"][domain] = {
            "raw_items": len(raw[domain]),
            "raw_chars": sum(len(t) for _, t in raw[domain]),
            "groups": len(groups),
            "train_texts": len(texts["train"]),
            "train_chars": sum(len(t) for t in texts["train"]),
            "candidates": {s: len(texts[s]) for s in ("profile", "eval")},
            # source files that training texts come from (code, docs; quotes and dictionary
            # pieces are their own groups, checked by text)
            "train_files": sorted(origin["train"]) if domain in ("code", "docs") else None,
        }
        d = manifest["domains"][domain]
        print(
            f"{domain:10s} raw {d['raw_items']:6d} items {d['raw_chars'] / 1e6:6.1f} MB  "
            f"train {d['train_texts']:6d} texts {d['train_chars'] / 1e6:5.1f} MB  "
            f"held-out candidates {args.candidates} + {args.candidates}",
            flush=True,
        )
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"train texts in {args.out / 'train'}, held-out candidates in {args.out / 'heldout'}")


if __name__ == "__main__":
    main()
