"""Quality through lm-eval, offline: named tasks, the user's task YAMLs, and held-out data turned
into a task at run time.

``prepare_tasks`` does everything that can fail before a model is loaded: it checks the include
paths, reads and checks ``--data``, writes the generated task (YAML + a normalised copy of the
data, both in a temp folder, with ABSOLUTE paths: lm-eval resolves ``data_files`` against the
current directory, not the YAML's folder), and resolves every task name. ``evaluate`` then runs
one in-memory model through ``lm_eval.simple_evaluate`` as ``HFLM(pretrained=model,
tokenizer=tok)`` and returns its metrics.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mfprune.errors import DataError, MfpruneError, did_you_mean
from mfprune.io.text import encoding_hint, not_json, not_utf8

#: Records with one of these fields give the question of a multiple-choice record (else "").
QUESTION_FIELDS = ("question", "query", "prompt", "context")


def set_offline() -> None:
    """No model or dataset hub: models and data are local (set before the HF libraries load;
    an explicit ``HF_HUB_OFFLINE=0`` in the environment wins)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@dataclass(frozen=True)
class QualitySpec:
    """What to evaluate: lm-eval task names, extra task folders, and/or JSONL data files
    (each becomes a task named ``data_<file stem>``)."""

    tasks: tuple[str, ...] = ()
    include_paths: tuple[Path, ...] = ()
    data: tuple[Path, ...] = ()
    limit: int | float | None = None  # per task: a count, or a share when < 1
    batch_size: int = 8
    num_fewshot: int | None = None

    @property
    def empty(self) -> bool:
        return not self.tasks and not self.data


def as_limit(value: float | None) -> int | float | None:
    """``--limit``: a whole number of documents (200.0 -> 200), or a share below 1 (0.1)."""
    if value is not None and value >= 1 and float(value).is_integer():
        return int(value)
    return value


@dataclass(frozen=True)
class Metric:
    """One lm-eval number: ``task/name`` (``,filter`` when the filter is not ``none``)."""

    task: str
    name: str
    filter: str
    value: float
    stderr: float | None
    higher_is_better: bool | None
    samples: int | None

    @property
    def key(self) -> str:
        suffix = "" if self.filter == "none" else f",{self.filter}"
        return f"{self.task}/{self.name}{suffix}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.name,
            "filter": self.filter,
            "value": self.value,
            "stderr": self.stderr,
            "higher_is_better": self.higher_is_better,
            "samples": self.samples,
        }


@dataclass(frozen=True)
class PreparedTasks:
    names: tuple[str, ...]  # what to hand to simple_evaluate
    task_manager: Any  # lm_eval.tasks.TaskManager
    data_tasks: dict[str, str]  # task generated from --data -> "perplexity" / "multiple_choice"


# ---------------------------------------------------------------------------- --data -> a task


DATA_METRICS = {  # what a task made from --data reports
    "perplexity": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "multiple_choice": ("acc", "acc_norm"),
}


def data_task_name(data: Path) -> str:
    """``heldout.jsonl`` -> ``data_heldout``: ASCII letters, digits and _ only (lm-eval task
    names); accents are folded (``données`` -> ``donnees``), and a name with letters that do not
    fold (``代码``) keeps them apart with a short hash of the file name."""
    original = data.name.split(".")[0]
    folded = unicodedata.normalize("NFKD", original).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^0-9A-Za-z_]+", "_", folded).strip("_")
    lost = any(c.isalnum() and not c.isascii() for c in unicodedata.normalize("NFKD", original))
    if lost or not stem:
        digest = hashlib.sha256(original.encode("utf-8")).hexdigest()[:8]
        stem = f"{stem}_{digest}" if stem else digest
    return f"data_{stem}"


def read_data_records(data: Path) -> tuple[str, list[dict[str, Any]]]:
    """Read ``--data`` and normalise it; return ``(kind, records)``.

    kind ``perplexity``: every record has a string ``text`` -> ``{"text"}``.
    kind ``multiple_choice``: every record has ``choices`` (2+ strings) and ``answer`` (an index
    or one of the choices), and optionally a question (``QUESTION_FIELDS``) ->
    ``{"question", "choices", "answer": index}``. Raises DataError with file:line.
    """
    if not data.exists():
        raise DataError(f"--data {data} does not exist", hint=_DATA_HINT)
    if not data.is_file():
        raise DataError(f"--data {data} is not a file", hint=_DATA_HINT)
    kind: str | None = None
    records: list[dict[str, Any]] = []
    raw = data.read_bytes()
    try:
        lines = raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(not_utf8(str(data), raw, exc.start), hint=encoding_hint(raw)) from None
    del raw
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{data}:{number}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise DataError(not_json(where, exc), hint=_DATA_HINT) from None
        if not isinstance(record, dict):
            raise DataError(f"{where} is not a JSON object", hint=_DATA_HINT)
        this = _record_kind(record, where)
        if kind is not None and this != kind:
            raise DataError(
                f"{where} is a {this.replace('_', '-')} record but earlier records are "
                f"{kind.replace('_', '-')}",
                hint="put perplexity (text) and multiple-choice records in separate files",
            )
        kind = this
        records.append(_normalise(record, kind, where))
    if kind is None:
        raise DataError(f"--data {data} holds no records", hint=_DATA_HINT)
    return kind, records


_DATA_HINT = (
    'a JSONL file of {"text": ...} records (perplexity) or {"question": ..., "choices": [...], '
    '"answer": index or choice} records (multiple choice)'
)


def _record_kind(record: dict[str, Any], where: str) -> str:
    if "choices" in record or "answer" in record:
        return "multiple_choice"
    if "text" in record:
        return "perplexity"
    fields = ", ".join(sorted(record)) or "none"
    raise DataError(
        f"{where} has neither 'text' nor 'choices' + 'answer' (fields: {fields})", hint=_DATA_HINT
    )


def _normalise(record: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    if kind == "perplexity":
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'text' must be a non-empty string", hint=_DATA_HINT)
        return {"text": text}
    choices = record.get("choices")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) for c in choices)
    ):
        raise DataError(f"{where}: 'choices' must be a list of 2 or more strings", hint=_DATA_HINT)
    answer = record.get("answer")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(
            f"{where}: 'answer' must be an index 0..{len(choices) - 1} or one of the choices, "
            f"got {answer!r}",
            hint=_DATA_HINT,
        )
    question = next((record[f] for f in QUESTION_FIELDS if f in record), "")
    if not isinstance(question, str):
        raise DataError(f"{where}: the question must be a string", hint=_DATA_HINT)
    return {"question": question, "choices": choices, "answer": answer}


def write_data_task(data: Path, folder: Path) -> tuple[str, str]:
    """Write ``folder/<name>.yaml`` + ``folder/<name>.jsonl`` for ``data``; return (name, kind).

    Every path in the YAML is absolute (lm-eval resolves ``data_files`` against the current
    directory); the ``datasets`` cache of this data goes into ``folder`` too.
    """
    import yaml

    kind, records = read_data_records(data)
    name = data_task_name(data)
    folder = folder.resolve()
    copy = folder / f"{name}.jsonl"
    copy.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(copy)},
            "cache_dir": str(folder / "datasets-cache"),
        },
        "test_split": "test",
    }
    if kind == "perplexity":
        config |= {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": "word_perplexity", "aggregation": "weighted_perplexity"},
                {"metric": "byte_perplexity", "aggregation": "weighted_perplexity"},
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte"},
            ],
        }
        for metric in config["metric_list"]:
            metric["higher_is_better"] = False
    else:
        config |= {
            "output_type": "multiple_choice",
            "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        }
    config["metadata"] = {"version": 1.0, "source": str(data.resolve())}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), "utf-8")
    return name, kind


# ---------------------------------------------------------------------------- task resolution


def prepare_tasks(spec: QualitySpec, workdir: Path) -> PreparedTasks:
    """Check the include paths and the data, generate the data task into ``workdir``, and
    resolve every task name (unknown names fail here, before any model is loaded)."""
    for path in spec.include_paths:
        if not path.is_dir():
            raise MfpruneError(
                f"--include-path {path} is not a folder",
                hint="pass a folder of lm-eval task YAMLs",
            )
    names = list(dict.fromkeys(spec.tasks))
    include = [str(p.resolve()) for p in spec.include_paths]
    data_tasks: dict[str, str] = {}
    for data in spec.data:
        name = data_task_name(data)
        if name in names or name in data_tasks:
            raise MfpruneError(
                f"two tasks would be named '{name}' (--data {data})",
                hint="give each --data file a different name",
            )
        data_tasks[name] = write_data_task(data, workdir)[1]
        names.append(name)
    if data_tasks:
        include.append(str(workdir.resolve()))
    with quiet_lm_eval():
        from lm_eval.tasks import TaskManager

        manager = None
        if include:  # lm-eval's own ~12,000 task YAMLs take seconds to index: only if needed
            local = TaskManager(include_path=include, include_defaults=False)
            if not _unknown(names, local):
                manager = local
        if manager is None:
            manager = TaskManager(include_path=include or None)
    unknown = _unknown(names, manager)
    if unknown:
        known = [*manager.all_tasks, *manager.all_groups, *manager.all_tags]
        problems = [f"'{n}'{did_you_mean(n, known)}" for n in unknown]
        raise MfpruneError(
            f"unknown lm-eval task {', '.join(problems)}",
            hint="`lm-eval ls tasks` lists lm-eval's tasks; add your own with --include-path DIR",
        )
    return PreparedTasks(names=tuple(names), task_manager=manager, data_tasks=data_tasks)


def expected_metric_keys(tasks: PreparedTasks) -> list[str] | None:
    """``task/metric[,filter]`` of every metric the prepared tasks will report, read from the
    task configs lm-eval has indexed (nothing is downloaded or run); None when some task's
    metrics are only known once it runs (a YAML file, a task with no ``metric_list``)."""
    keys: list[str] = []
    for name in tasks.names:
        if name in tasks.data_tasks:
            keys += [f"{name}/{m}" for m in DATA_METRICS[tasks.data_tasks[name]]]
            continue
        index = tasks.task_manager.task_index
        members = fnmatch.filter(index, name) if _is_glob(name) else [name]
        for member in members:
            found = _config_metric_keys(member, index, seen=set())
            if found is None:
                return None
            keys += found
    return list(dict.fromkeys(keys))


def _config_metric_keys(name: str, index: dict[str, Any], *, seen: set[str]) -> list[str] | None:
    """The metric keys of one indexed task, group (its aggregates, then its members) or tag;
    None when they are only known at run time (e.g. a metric given as a ``!function``)."""
    entry = index.get(name)
    if entry is None or name in seen:  # unknown, or a group that contains itself
        return None
    seen = seen | {name}
    kind = str(getattr(entry, "kind", "")).rsplit(".", 1)[-1]
    cfg = entry.cfg or {}
    if kind == "TASK":
        filters = [f.get("name") for f in cfg.get("filter_list", [])] or ["none"]
        pairs = [(m.get("metric"), f) for m in cfg.get("metric_list", []) for f in filters]
        return _metric_keys(name, pairs) if pairs else None
    if kind == "TAG":
        members, own = sorted(entry.tags or ()), []
    elif kind == "GROUP":
        members = cfg.get("task", [])
        members = [members] if isinstance(members, str) else members
        aggregates = cfg.get("aggregate_metric_list", [])
        pairs = [(m.get("metric"), m.get("filter_list", "none")) for m in aggregates]
        own = _metric_keys(name, pairs)
    else:
        return None
    keys = own
    for member in members:
        found = _config_metric_keys(member, index, seen=seen) if isinstance(member, str) else None
        if found is None or keys is None:
            return None
        keys += found
    return keys


def _metric_keys(task: str, pairs: list[tuple[Any, Any]]) -> list[str] | None:
    if not all(isinstance(m, str) and isinstance(f, str) for m, f in pairs):
        return None
    return [f"{task}/{m}" + ("" if f == "none" else f",{f}") for m, f in pairs]


def _unknown(names: list[str], manager: Any) -> list[str]:
    known = {*manager.all_tasks, *manager.all_groups, *manager.all_tags}
    return [
        n
        for n in names
        if n not in known and not (_is_glob(n) and fnmatch.filter(known, n)) and not _is_yaml(n)
    ]


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def _is_yaml(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


# ---------------------------------------------------------------------------- evaluation


def evaluate(model: Any, tokenizer: Any, tasks: PreparedTasks, spec: QualitySpec) -> list[Metric]:
    """Run ``model`` (in memory, already on its device) through lm-eval; return its metrics."""
    with quiet_lm_eval(), _no_env_info():
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks.names),
            task_manager=tasks.task_manager,
            limit=spec.limit,
            num_fewshot=spec.num_fewshot,
            log_samples=False,
        )
    if results is None:  # only on non-zero ranks under accelerate
        return []
    return metrics_of(results)


def metrics_of(results: dict[str, Any]) -> list[Metric]:
    """The metrics of an lm-eval results dict (``simple_evaluate``'s return value)."""
    metrics: list[Metric] = []
    better = results.get("higher_is_better", {})
    samples = results.get("n-samples", {})
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," not in key or "_stderr," in key or not isinstance(value, int | float):
                continue
            name, filt = key.split(",", 1)
            stderr = values.get(f"{name}_stderr,{filt}")
            metrics.append(
                Metric(
                    task=task,
                    name=name,
                    filter=filt,
                    value=float(value),
                    stderr=float(stderr) if isinstance(stderr, int | float) else None,
                    higher_is_better=better.get(task, {}).get(name),
                    samples=samples.get(task, {}).get("effective"),
                )
            )
    return metrics


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs a warning for every in-memory model and undeclared metric: keep its
    loggers at ERROR unless MFPRUNE_DEBUG is set (its progress bars still show)."""
    if os.environ.get("MFPRUNE_DEBUG"):
        yield
        return
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval", "datasets", "evaluate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _no_env_info() -> Iterator[None]:
    """Skip what simple_evaluate adds about the environment (the cwd's git hash, torch's
    collect_env): mfprune's report does not use it, it costs a second or two per run, and git
    prints "fatal: not a git repository" outside a repository. Numbers are unaffected."""
    from lm_eval import evaluator

    saved = {n: getattr(evaluator, n, None) for n in ("get_git_commit_hash", "add_env_info")}
    for name, fn in saved.items():
        if fn is not None:
            setattr(evaluator, name, _nothing)
    try:
        yield
    finally:
        for name, fn in saved.items():
            if fn is not None:
                setattr(evaluator, name, fn)


def _nothing(*_args: Any, **_kwargs: Any) -> None:
    return None
