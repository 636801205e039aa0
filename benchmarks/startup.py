"""Benchmark the start-up of the `mfprune` commands that do not run a model.

Each command runs ``--repeats`` times in a fresh ``python -X importtime -m mfprune`` child on the
embedded default model (inspect, prune with a plan, show, merge-stats, --help); the report gives
the median wall time and whether torch / transformers were imported (read
from ``-X importtime``'s list of every module imported). ``--json FILE`` saves the numbers;
``--before FILE`` adds a column from an earlier run, ``--before-repo DIR`` times another
checkout first (e.g. the commit before a change), and ``--write-docs`` puts the table into
docs/benchmarks.md.

Run: ``.venv/bin/python benchmarks/startup.py [--repeats 5] [--json after.json]
[--before before.json] [--write-docs]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_model, replace_section  # benchmarks/_common.py (scripts run from here)

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:startup:begin -->", "<!-- bench:startup:end -->"
HEAVY = ("torch", "transformers")


def imported(stderr: str) -> set[str]:
    """Module names in ``-X importtime`` output (``import time: self | cumulative | name``)."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def run_once(args: list[str], cwd: Path, repo: Path = REPO) -> tuple[float, set[str], int]:
    """(seconds, modules imported, exit code) of one child running the mfprune in ``repo``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), str(repo / "kernels")])
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "mfprune", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    return seconds, imported(stderr), proc.returncode


def mfprune(*args: str, cwd: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "mfprune", *args, "--format", "quiet"], check=True, cwd=cwd
    )


def prepare(work: Path) -> dict[str, list[str]]:
    """The inputs (a profile, a plan, two stats files) and each command's arguments."""
    data = REPO / "mfprune" / "default_model" / "data" / "code.profile.jsonl"
    stats = work / "code.stats.safetensors"
    for shard, path in (("0/2", "a.safetensors"), ("1/2", "b.safetensors")):
        mfprune("profile", "default", "--data", str(data), "--out", path, "--max-tokens", "2000",
                "--shard", shard, cwd=work)  # fmt: skip
    mfprune("merge-stats", "a.safetensors", "b.safetensors", "--out", str(stats), cwd=work)
    plan = work / "plan.json"
    mfprune("prune", "default", "--profile", str(stats), "--keep-ratio", "0.5", "--plan-only",
            "--plan-out", str(plan), cwd=work)  # fmt: skip
    return {
        "mfprune --help": ["--help"],
        "mfprune inspect default": ["inspect", "default"],
        "mfprune prune default --plan P --out O": [
            *("prune", "default", "--plan", str(plan), "--out", "{out}")
        ],
        "mfprune show STATS": ["show", str(stats)],
        "mfprune merge-stats A B --out M": [
            *("merge-stats", "a.safetensors", "b.safetensors", "--out", "{merged}")
        ],
    }


def measure(repeats: int, repo: Path = REPO) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mfprune-startup-") as tmp:
        work = Path(tmp)
        commands = prepare(work)
        for name, args in commands.items():
            times, heavy, codes = [], set(), set()
            for i in range(repeats + 1):  # the first run warms the page cache and is dropped
                actual = [
                    a.format(out=work / f"out-{i}", merged=work / f"m-{i}.safetensors")
                    for a in args
                ]
                seconds, modules, code = run_once(actual, work, repo)
                codes.add(code)
                if i:
                    times.append(seconds)
                heavy |= {m for m in HEAVY if m in modules}
            results[name] = {
                "seconds": statistics.median(times),
                "min": min(times),
                "max": max(times),
                "imports": sorted(heavy),
                "exit_codes": sorted(codes),
            }
            print(f"{name}: {results[name]}", flush=True)
    return results


def table(after: dict[str, Any], before: dict[str, Any] | None, repeats: int) -> str:
    lines = [
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"median of {repeats} runs each (a warm-up run dropped), wall time of the whole child "
        "process.",
        "",
    ]
    if before:
        lines += [
            "| command | before | imports before | after | imports after |",
            "|---|---:|---|---:|---|",
        ]
    else:
        lines += ["| command | seconds | imports |", "|---|---:|---|"]
    for name, a in after.items():
        cells = [f"`{name}`"]
        if before and name in before:
            b = before[name]
            cells += [f"{b['seconds']:.2f} s", ", ".join(b["imports"]) or "neither"]
        elif before:
            cells += ["—", "—"]
        cells += [f"{a['seconds']:.2f} s", ", ".join(a["imports"]) or "neither"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="save the numbers here")
    parser.add_argument("--before", type=Path, help="numbers of an earlier run, as a column")
    parser.add_argument(
        "--before-repo", type=Path, help="another checkout (e.g. `git archive` of an earlier "
        "commit): time it first, as the before column (the inputs are made with this one)",
    )  # fmt: skip
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    before = measure(args.repeats, args.before_repo.resolve()) if args.before_repo else None
    after = measure(args.repeats)
    if args.json:
        args.json.write_text(json.dumps(after, indent=2) + "\n")
    if args.before:
        before = json.loads(args.before.read_text())
    text = table(after, before, args.repeats)
    print(text)
    if args.write_docs:
        replace_section(DOCS, BEGIN, END, text)


if __name__ == "__main__":
    main()
