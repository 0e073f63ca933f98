"""Built-in tasks and models that need no download, and the one parser of `builtin:` specs.

- data `builtin:reverse` (training rows) and `builtin:reverse:eval` (its held-out split);
  `builtin:calculator` and `builtin:calculator:eval`, the multi-turn task with a calculator tool;
- models `builtin:tiny-reverse` and `builtin:tiny-calculator` (the demos' tiny Qwen2, each
  warm-started on its task by imitating an imperfect teacher; built once and cached),
  `builtin:tiny-random` and `builtin:small-random` (freshly initialised tiny / small Qwen2 with
  the character tokenizer).

This package sits above the engine: the engine never imports it. Stages resolve a spec here
(`model_path`, `dataset_rows`, `task_of`) and hand the engine plain paths and rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..engine.configlib import ConfigError
from .calculator import CalculatorTask, calculator, calculator_reward
from .reverse import ReverseTask, reverse_reward

PREFIX = "builtin:"
TASKS = {"reverse": ReverseTask, "calculator": CalculatorTask}
Task = ReverseTask | CalculatorTask

# builtin model name → (task, tiny size, SFT settings of the warm start on the task's teacher)
BUILTIN_MODELS = {
    "tiny-reverse": dict(task="reverse", size="tiny", sft=dict(steps=600, batch_size=64, lr=2e-3)),
    "tiny-calculator": dict(
        task="calculator", teacher=1, size="tiny", sft=dict(steps=500, batch_size=32, lr=2e-3)
    ),
    "tiny-random": dict(task="reverse", size="tiny", sft=dict(steps=0)),
    "small-random": dict(task="reverse", size="small", sft=dict(steps=0)),
}
WARM_START_VERSION = 2  # bump when the task, tokenizer or warm-start code changes
# (`teacher` in a model's entry versions that task's teacher alone: bump it to rebuild one model)


def parse_builtin(spec: str) -> tuple[str, str] | None:
    """`"builtin:NAME[:SPLIT]"` → (NAME, SPLIT or ""); None when `spec` is not a builtin spec."""
    if not spec.startswith(PREFIX):
        return None
    name, _, split = spec.removeprefix(PREFIX).partition(":")
    return name, split


def cache_dir() -> Path:
    return Path(os.environ.get("ADVANTAGE_CACHE", Path.home() / ".cache" / "advantage"))


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name]()


def task_of(spec: str | None, field: str = "data.train") -> Task | None:
    """The built-in task a data spec names (`builtin:reverse[:eval]`, ...), else None."""
    parsed = parse_builtin(spec) if spec else None
    if parsed is None:
        return None
    try:
        return get_task(parsed[0])
    except ValueError as e:
        raise ConfigError(f"{field}: {e}") from None


def require_data(spec: str | None, field: str = "data.train") -> str:
    """`spec`, which the user must give: no stage trains on a default dataset silently."""
    if spec is None or not str(spec).strip():
        raise ConfigError(
            f"{field} is required: a .jsonl file, a datasets folder, or builtin:reverse"
        )
    return spec


def dataset_rows(spec: str | None, field: str = "data.train") -> list[dict]:
    """Prompt rows of `spec`: a built-in task's split, or whatever `engine.data.load_rows` reads."""
    from ..engine.data import load_rows

    task = task_of(require_data(spec, field), field)
    if task is None:
        return load_rows(spec, field)
    return task.eval_rows() if parse_builtin(spec)[1] == "eval" else task.train_rows()


def eval_spec(train_spec: str) -> str | None:
    """The held-out split that goes with a training spec (built-in tasks only), else None."""
    parsed = parse_builtin(train_spec)
    return None if parsed is None else f"{PREFIX}{parsed[0]}:eval"


def model_path(spec: str, field: str = "model.name_or_path") -> str:
    """A model spec as a path: `builtin:NAME` → its cached folder (built on first use); anything
    else goes through `engine.models.check_model_path`."""
    from ..engine.models import check_model_path

    parsed = parse_builtin(spec)
    if parsed is None:
        return check_model_path(spec, field)
    try:
        return str(builtin_model_path(parsed[0]))
    except ValueError as e:
        raise ConfigError(f"{field}: {e}") from None


def model_paths(model) -> tuple[str, str]:
    """(model folder, tokenizer folder) of a `ModelConfig`: `model.tokenizer` when set (checked
    like a model), else the model's. Folders and hub ids are checked before a built-in model is
    built: a typo in either field fails at once, not after a first build (minutes)."""
    fields = [(model.name_or_path, "model.name_or_path")]
    if model.tokenizer:
        fields.append((model.tokenizer, "model.tokenizer"))
    paths = {}
    for spec, field in sorted(fields, key=lambda f: parse_builtin(f[0]) is not None):
        paths[field] = model_path(spec, field)
    path = paths["model.name_or_path"]
    return path, paths.get("model.tokenizer", path)


def builtin_model_path(name: str, verbose: bool = True) -> Path:
    """Folder of the built-in model `name`, building and warm-starting it on first use.

    The folder is written to a temporary directory and renamed into place, so an interrupted
    build is never picked up.
    """
    from ..engine.supervised import SFTSettings, supervised_finetune
    from .tiny import char_tokenizer, tiny_qwen2

    if name not in BUILTIN_MODELS:
        valid = ", ".join(f"{PREFIX}{n}" for n in BUILTIN_MODELS)
        raise ValueError(f"unknown built-in model '{PREFIX}{name}'; valid: {valid}")
    spec = BUILTIN_MODELS[name]
    key = hashlib.sha1(json.dumps([spec, WARM_START_VERSION], sort_keys=True).encode()).hexdigest()
    path = cache_dir() / f"{name}-{key[:10]}"
    if (path / "config.json").is_file():
        return path
    task = get_task(spec["task"])
    tokenizer = char_tokenizer()
    model = tiny_qwen2(spec["size"], vocab_size=len(tokenizer))
    if spec["sft"]["steps"]:
        settings = SFTSettings(**spec["sft"])
        if verbose:
            print(
                f"building {PREFIX}{name}: warm start by SFT on an imperfect teacher "
                f"(cached in {path})",
                file=sys.stderr,
            )
        rows = task.sft_rows(settings.steps * settings.batch_size, seed=settings.seed)
        progress = _print_every(100, settings.steps) if verbose else None
        stats = supervised_finetune(model, tokenizer, rows, settings, on_step=progress)
        if verbose:
            print(
                f"warm start done in {stats['seconds']:.0f}s (final SFT loss {stats['loss']:.3f})",
                file=sys.stderr,
            )
    save_folder(model, tokenizer, path)
    return path


def save_folder(model, tokenizer, path: Path) -> None:
    """`model` and `tokenizer` saved to `path` through a temporary folder renamed into place, so
    an interrupted save is never picked up (another process that finished first wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


def _print_every(n: int, total: int):
    """An `on_step` that prints the SFT loss every `n` steps (the warm start's progress)."""
    start = time.perf_counter()

    def on_step(step: int, metrics: dict) -> None:
        if step % n == 0:
            print(
                f"  sft step {step}/{total}  loss {metrics['loss']:.4f}  "
                f"{time.perf_counter() - start:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    return on_step


__all__ = [
    "BUILTIN_MODELS",
    "TASKS",
    "CalculatorTask",
    "ReverseTask",
    "Task",
    "builtin_model_path",
    "calculator",
    "calculator_reward",
    "dataset_rows",
    "eval_spec",
    "get_task",
    "model_path",
    "model_paths",
    "parse_builtin",
    "require_data",
    "reverse_reward",
    "task_of",
]
