"""Peak memory of reading and tokenizing task data: one huge single-line document vs the same
bytes split into lines.

Before mfprune tokenized long texts in pieces, a 60 MB single-line JSONL document took 13.7 GB
of RAM (the tokenizer's whole-text encoding, then a Python list of every id). This script writes
~SIZE MB of the default model's profile texts twice — as ONE JSONL record and as one record per
original text — and measures, in fresh processes, interleaved:

* ``tokenize``: ``load_token_data`` over the whole file (every token kept), peak RSS and time;
* ``profile``: ``mfprune profile default --max-tokens N`` (the bounded run a user makes), peak
  RSS and time.

    python benchmarks/long_documents.py [--size-mb 100] [--repeats 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import cpu_model, replace_section  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:long-documents:begin -->", "<!-- bench:long-documents:end -->"

_TOKENIZE = """
import sys, resource
from mfprune.profiling.data import load_token_data
from mfprune.profiling.run import load_tokenizer
from mfprune.checkpoint import model_location
tok = load_tokenizer(model_location("default"))
data = load_token_data(sys.argv[1], tok, seq_len=512)
print(data.tokens)
"""


def write_inputs(folder: Path, size_mb: int) -> tuple[Path, Path]:
    """The same text twice: one JSONL line holding all of it, and one line per source text."""
    from mfprune.default_model import DEFAULT_DATA_DIR

    texts = []
    for name in sorted(Path(DEFAULT_DATA_DIR).glob("*.profile.jsonl")):
        texts += [json.loads(line)["text"] for line in name.read_text().splitlines()]
    pieces, total = [], 0
    while total < size_mb * 1_000_000:
        for t in texts:
            pieces.append(t)
            total += len(t) + 1
    folder.mkdir()
    one, many = folder / "one-line.jsonl", folder / "lines.jsonl"
    one.write_text(json.dumps({"text": "\n".join(pieces)}) + "\n")
    with open(many, "w") as f:
        for t in pieces:
            f.write(json.dumps({"text": t}) + "\n")
    return one, many


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """Peak RSS (MB) and wall time (s) of one fresh process, and its stdout."""
    code = (
        "import resource, runpy, sys\n"
        f"sys.argv = {cmd!r}\n"
        + (
            f"exec(compile({_TOKENIZE!r}, 'tokenize', 'exec'))\n"
            if cmd[0] == "tokenize"
            else "from mfprune.cli import app\ntry:\n    app()\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
        )
        + "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)"
    )
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{cmd} failed:\n{done.stderr[-2000:]}")
    rss = next(int(x.split()[1]) for x in done.stderr.splitlines() if x.startswith("MAXRSS"))
    return rss / 1024, seconds, done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=100, help="input of the profile runs")
    parser.add_argument("--tokenize-mb", type=int, default=20, help="input of the tokenize runs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=20_000)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mfprune-long-") as tmp:
        inputs = {
            job: write_inputs(Path(tmp) / job, mb)
            for job, mb in (("tokenize", args.tokenize_mb), ("profile", args.size_mb))
        }
        sizes = {job: one.stat().st_size / 1e6 for job, (one, _) in inputs.items()}
        for r in range(args.repeats):
            for i, layout in enumerate(("one line", "lines")):  # interleaved
                path = {job: str(pair[i]) for job, pair in inputs.items()}
                out = Path(tmp) / f"s{r}.safetensors"
                jobs = {
                    "tokenize": ["tokenize", path["tokenize"]],
                    "profile": ["mfprune", "profile", "default", "--data", path["profile"], "--out",
                                str(out), "--max-tokens", str(args.max_tokens), "--seq-len",
                                "512", "--format", "quiet"],
                }  # fmt: skip
                for job, cmd in jobs.items():
                    rss, seconds, _ = measure(cmd)
                    rows.setdefault((job, layout), []).append((rss, seconds))
                    print(f"repeat {r}: {job:8s} {layout:8s} {rss:8.0f} MB  {seconds:6.1f} s")
    lines = [
        f"Machine: {cpu_model()}, {os.cpu_count()} cores (shared while it ran); the default "
        f"model's profile texts repeated to {sizes['profile']:.0f} MB (profile) and "
        f"{sizes['tokenize']:.0f} MB (tokenize); {args.repeats} interleaved repeats, a fresh "
        "process each (median, range).",
        "",
        "| stage | layout | peak RSS (MB) | time (s) | RSS one line / lines |",
        "|---|---|---:|---:|---:|",
    ]
    for job in ("tokenize", "profile"):
        ratios = [
            a[0] / b[0] for a, b in zip(rows[(job, "one line")], rows[(job, "lines")], strict=True)
        ]
        for layout in ("one line", "lines"):
            rss = [x[0] for x in rows[(job, layout)]]
            secs = [x[1] for x in rows[(job, layout)]]
            ratio = (
                f"×{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"
                if layout == "one line"
                else ""
            )
            what = "all tokens" if job == "tokenize" else f"--max-tokens {args.max_tokens:,}"
            lines.append(
                f"| {job} ({what}) | {layout} | {statistics.median(rss):,.0f} "
                f"({min(rss):,.0f}–{max(rss):,.0f}) | {statistics.median(secs):.1f} | {ratio} |"
            )
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        replace_section(DOCS, BEGIN, END, text)


if __name__ == "__main__":
    main()
