"""The command line behaves like the tools a user knows: --version, -h, every usage error one
`error:` line with a hint and exit 2, and Ctrl-C at any moment (start-up included) one line and
exit 130 — run as a real process, as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mfprune import __version__
from mfprune.cli import run

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "mfprune" / "default_model" / "data" / "code.profile.jsonl"


def child_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def mfprune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mfprune", *args],
        capture_output=True, text=True, env=child_env(), cwd=cwd, timeout=120,
    )  # fmt: skip


def test_version_and_short_help():
    result = mfprune("--version")
    assert result.returncode == 0 and result.stdout == f"mfprune {__version__}\n"
    for args in (["-h"], ["prune", "-h"]):
        result = mfprune(*args)
        assert result.returncode == 0 and result.stdout.startswith("Usage: mfprune"), args
        assert result.stdout == mfprune(*args[:-1], "--help").stdout


USAGE_ERRORS = {
    "missing option": (["prune", "default"], "missing option '--out'", "mfprune prune --help"),
    "missing argument": (["inspect"], "missing argument 'model'", "mfprune inspect --help"),
    "bad choice": (["inspect", "default", "--format", "xml"], "'--format'", "inspect --help"),
    "bad number": (["prune", "default", "-o", "x", "--keep", "abc"], "'--keep'", "prune --help"),
    "unknown command": (["bogus"], "no such command 'bogus'", "`mfprune --help`"),
    "unknown option": (["--frob"], "no such option: --frob", "`mfprune --help`"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_are_one_line_with_a_hint(case, capsys):
    args, message, hint = USAGE_ERRORS[case]
    assert run(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and message in lines[0] and hint in lines[0]
    assert "(hint: " in lines[0] and "Usage:" not in err


def test_usage_error_through_the_entry_point():
    result = mfprune("prune", "default")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "error: missing option '--out' / '-o' (hint: name the output folder; see "
        "`mfprune prune --help`)\n"
    )


def test_a_domain_error_while_parsing_is_one_line(capsys, tmp_path):
    assert run(["inspect", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "(hint: " in err


@pytest.fixture(scope="module")
def big_data(tmp_path_factory) -> Path:
    """Enough task data that profiling it takes longer than the last interrupt moment."""
    lines = DATA.read_text(encoding="utf-8").splitlines()
    path = tmp_path_factory.mktemp("ctrl-c") / "big.jsonl"
    path.write_text("\n".join(lines * 40) + "\n", encoding="utf-8")
    return path


def interrupt_at(delay: float, args: list[str], cwd: Path, signum: int = signal.SIGINT):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mfprune", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=cwd,
    )  # fmt: skip
    time.sleep(delay)
    still_running = proc.poll() is None
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return still_running, proc.returncode, out, err


@pytest.fixture(scope="module")
def python_start() -> float:
    """Seconds the interpreter takes before any mfprune code runs (site, the venv's path
    hooks): an interrupt then is Python's own; every moment below comes after it."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import mfprune"], env=child_env(), check=True)
        times.append(time.perf_counter() - start)
    return 1.5 * max(times)


# after the interpreter's start-up: mfprune's imports (typer, rich), option parsing, loading
# the model and tokenizer, tokenizing, the forwards
MOMENTS = (0.0, 0.1, 0.3, 0.7, 1.5, 3.0)


@pytest.mark.parametrize("moment", MOMENTS)
def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(moment, python_start, big_data, tmp_path):
    out = tmp_path / "stats.safetensors"
    args = ["profile", "default", "--data", str(big_data), "--out", str(out)]
    running, code, stdout, stderr = interrupt_at(python_start + moment, args, tmp_path)
    assert running, "the command finished before the interrupt: give it more data"
    assert code == 130, stderr
    assert "Traceback" not in stderr and stdout == ""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted (hint: "), stderr
    assert "resume" not in lines[0]  # nothing can be resumed: the hint says what is true
    assert not out.exists() and not any(tmp_path.glob(".*tmp*"))


def test_sigterm_is_one_line_and_exit_143(big_data, tmp_path):
    args = ["profile", "default", "--data", str(big_data), "--out", str(tmp_path / "s")]
    running, code, _, stderr = interrupt_at(1.0, args, tmp_path, signal.SIGTERM)
    assert running and code == 143, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: interrupted")


def test_json_is_the_only_thing_on_stdout():
    result = mfprune("inspect", "default", "--format", "json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["family"]


def imported_modules(stderr: str) -> set[str]:
    """Every module named in ``python -X importtime``'s report."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def test_commands_that_run_no_model_import_neither_torch_nor_transformers(tmp_path):
    plan = tmp_path / "plan.json"
    kept = {str(layer): list(range(8)) for layer in range(4)}  # every MoE layer keeps 8 of 16
    plan.write_text(json.dumps({"format": "mfprune.plan/1", "experts": kept}))
    commands = {
        "help": ["--help"],
        "version": ["--version"],
        "inspect": ["inspect", "default"],
        "prune with a plan": ["prune", "default", "--plan", str(plan), "--out", "pruned"],
    }
    for name, args in commands.items():
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "mfprune", *args],
            capture_output=True, text=True, env=child_env(), cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, (name, result.stderr[-2000:])
        modules = imported_modules(result.stderr)
        assert "mfprune.cli" in modules  # the report is read right
        assert not {"torch", "transformers"} & modules, name
    assert (tmp_path / "pruned" / "model.safetensors").exists()
