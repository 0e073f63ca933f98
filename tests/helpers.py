"""Test helpers: small configs on the locally built tiny models (nothing downloaded)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def length_reward(prompts, completions, **kwargs):
    """A reward with variance even for an untrained model: longer completions score higher."""
    return [len(c) / 8.0 for c in completions]


def small_config(run_dir, *overrides: str, model: str = "builtin:tiny-random") -> list[str]:
    """Overrides for a fast run on the built-in task: 2 prompts × 4 completions, 6 new tokens,
    no eval."""
    return [
        f"model.name_or_path={model}",
        "data.train=builtin:reverse",
        f"log.run_dir={run_dir}",
        "log.progress=false",
        "log.tensorboard=false",
        "rollout.prompts_per_step=2",
        "rollout.num_generations=4",
        "rollout.max_new_tokens=6",
        "train.steps=3",
        "train.lr=1e-3",
        "train.critic_lr=1e-3",
        "eval.size=0",
        "checkpoint.save_final=false",
        "data.eval=null",
        *overrides,
    ]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium is needed (make test installs it)"
    return found


def rendered_page(page: Path, profile: Path) -> tuple[str, int, int]:
    """(DOM, images loaded, images) of an HTML page rendered in headless Chromium; the counts
    are what the page's script wrote after its load event (engine/report.py `page_html`)."""
    dom = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total, dom[:500]
    return dom, int(loaded.group(1)), int(total.group(1))
