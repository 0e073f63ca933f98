"""Metrics out: `RUN_DIR/metrics.jsonl` (one JSON object per logged step), TensorBoard, W&B,
and the console (a rich progress bar, or one plain line per step)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

CONSOLE_KEYS = (
    ("eval/accuracy", "eval acc", "{:.3f}"),
    ("reward/mean", "reward", "{:.3f}"),
    ("kl", "kl", "{:.4f}"),
    ("entropy", "ent", "{:.3f}"),
    ("loss/policy", "pg", "{:+.4f}"),
    ("completion/length", "len", "{:.1f}"),
    ("time/step", "s/step", "{:.2f}"),
    ("loss", "loss", "{:.4f}"),
    ("accuracy", "acc", "{:.3f}"),
    ("eval/loss", "eval loss", "{:.4f}"),
)


def _number(v):
    if hasattr(v, "item"):
        v = v.item()
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        tensorboard: bool = True,
        wandb: bool = False,
        progress: bool = True,
        config: dict | None = None,
        enabled: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.total_steps = total_steps
        self._tb = None
        self._wandb = None
        self._progress = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wb
            except ImportError as e:
                raise RuntimeError("log.wandb=true needs `pip install wandb`") from e
            self._wandb = wb.init(project="advantage", dir=str(self.run_dir), config=config or {})
        if progress:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self._task = None

    def start(self, first_step: int) -> None:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=self.total_steps, completed=first_step, info=""
            )

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time()}
        record.update({k: _number(v) for k, v in metrics.items()})
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, float) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                if k not in ("step", "time"):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        info = "  ".join(
            f"{short} {fmt.format(record[k])}"
            for k, short, fmt in CONSOLE_KEYS
            if isinstance(record.get(k), float)
        )
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step, info=info)
        elif info:
            print(f"step {step:>5}  {info}", flush=True)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        if not self.enabled or not samples:
            return
        with self.samples_path.open("a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}) + "\n")

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None and self._task is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
