"""Built-in tasks and models that need no download: `builtin:reverse` data and the
`builtin:tiny-reverse` model (a tiny Qwen2 warm-started on the task by imitating an imperfect
teacher; built once and cached)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .reverse import ReverseTask, reverse_reward

TASKS = {"reverse": ReverseTask}

# builtin model name → (task, tiny size, SFT settings, demonstrations)
BUILTIN_MODELS = {
    "tiny-reverse": dict(task="reverse", size="tiny", sft=dict(steps=600, batch_size=64, lr=2e-3)),
    "tiny-random": dict(task="reverse", size="tiny", sft=dict(steps=0)),
    "small-random": dict(task="reverse", size="small", sft=dict(steps=0)),
}
WARM_START_VERSION = 2  # bump when the task, tokenizer or warm-start code changes


def cache_dir() -> Path:
    return Path(os.environ.get("ADVANTAGE_CACHE", Path.home() / ".cache" / "advantage"))


def get_task(name: str) -> ReverseTask:
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name]()


def builtin_model_path(name: str, verbose: bool = True) -> Path:
    """Folder of the built-in model `name`, building and warm-starting it on first use.

    The folder is written to a temporary directory and renamed into place, so an interrupted
    build is never picked up.
    """
    from ..sft import SFTSettings, supervised_finetune
    from .tiny import char_tokenizer, tiny_qwen2

    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model 'builtin:{name}'; valid: "
                         + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS))  # fmt: skip
    spec = BUILTIN_MODELS[name]
    key = hashlib.sha1(json.dumps([spec, WARM_START_VERSION], sort_keys=True).encode()).hexdigest()
    path = cache_dir() / f"{name}-{key[:10]}"
    if (path / "config.json").is_file():
        return path
    task = get_task(spec["task"])
    tokenizer = char_tokenizer()
    model = tiny_qwen2(spec["size"], vocab_size=len(tokenizer))
    settings = SFTSettings(**spec["sft"], log_every=100 if verbose else 0)
    if settings.steps:
        if verbose:
            print(
                f"building builtin:{name}: warm start by SFT on an imperfect teacher (cached in {path})",
                file=sys.stderr,
            )
        rows = task.sft_rows(settings.steps * settings.batch_size, seed=settings.seed)
        stats = supervised_finetune(model, tokenizer, rows, settings)
        if verbose:
            print(
                f"warm start done in {stats['seconds']:.0f}s (final SFT loss {stats['loss']:.3f})",
                file=sys.stderr,
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


__all__ = ["BUILTIN_MODELS", "TASKS", "builtin_model_path", "get_task", "reverse_reward"]
