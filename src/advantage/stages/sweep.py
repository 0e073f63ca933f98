"""`advantage sweep CONFIG.yaml --presets grpo rloo --grid scope=group,batch --seeds 3`: every
preset × grid point × seed is an ordinary run (`advantage train` in a subprocess) in its own
folder, then one comparison page (`advantage.stages.compare`):

    SWEEP_DIR/
      sweep.json              the manifest: command, configurations, seeds, run folders, status
      grpo/seed-0/            an ordinary run: metrics.jsonl, report/, checkpoints/, train.log
      grpo__scope-batch/seed-1/
      compare/index.html      the comparison page and its PNGs; compare/table.md

A run is **finished** when its end is complete at step `train.steps`: the trainer's mark
`RUN_DIR/finished.json`, written after the last checkpoint, the evaluation after RL, the final
model and the report (a run killed before it resumes and finishes them). A rerun of the same
command skips finished runs and resumes the others with `checkpoint.resume=auto` from their
newest checkpoint (set `checkpoint.every` to keep mid-run checkpoints; without one an unfinished
run starts over).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..engine.checkpoint import finished_step, latest_checkpoint
from ..engine.configlib import ConfigError, check_at_least
from ..rl.config import AlgoConfig, Config, load_config
from ..rl.config_changes import config_changes, resume_view, saved_algorithm
from ..tasks import model_path
from .compare import make_compare

ALGO_AXES = {f.name for f in dataclasses.fields(AlgoConfig)}


@dataclass(frozen=True)
class Combination:
    """One configuration of the sweep: a preset and one value on each grid axis."""

    name: str
    """Its folder name: the preset, then `__axis-value` for each axis of several values."""
    overrides: tuple[str, ...]
    """`key=value` overrides that make it (`algorithm=grpo`, `algo.scope=batch`, ...)."""


@dataclass
class SweepRun:
    combination: Combination
    seed: int
    run_dir: Path
    config: Config
    """The run's validated config (what `advantage train` will build from the same overrides)."""


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`["scope=group,batch", "train.lr=1e-4,3e-4"]` → {"algo.scope": ["group", "batch"],
    "train.lr": ["1e-4", "3e-4"]}. A key without a section is an algorithm axis (`algo.`);
    values stay text, read like any `key=value` override when the run's config is loaded."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or not text:
            raise ConfigError(f"--grid {item!r}: write AXIS=VALUE1,VALUE2 (e.g. scope=group,batch)")
        if "." not in key:
            if key not in ALGO_AXES:
                raise ConfigError(
                    f"--grid {item!r}: {key!r} is not an algorithm axis; valid: "
                    f"{', '.join(sorted(ALGO_AXES))} (or give a section: train.lr=...)"
                )
            key = f"algo.{key}"
        grid[key] = text.split(",")
    return grid


def combinations(presets: list[str], grid: dict[str, list[str]]) -> list[Combination]:
    """Every preset × grid point. An axis of one value is a setting of every run, left out of
    the folder names."""
    fixed = [f"{key}={values[0]}" for key, values in grid.items() if len(values) == 1]
    axes = {key: values for key, values in grid.items() if len(values) > 1}
    out = []
    for preset in presets:
        for point in itertools.product(*axes.values()):
            chosen = dict(zip(axes, point, strict=True))
            name = preset + "".join(
                f"__{key.removeprefix('algo.')}-{value}" for key, value in chosen.items()
            )
            overrides = [f"algorithm={preset}", *fixed, *(f"{k}={v}" for k, v in chosen.items())]
            out.append(Combination(name, tuple(overrides)))
    return out


def run_overrides(overrides: list[str], combo: Combination, seed: int, run_dir: Path) -> list[str]:
    """The `key=value` overrides of one run, after CONFIG.yaml (the sweep's come last: they win)."""
    return [
        *overrides,
        *combo.overrides,
        f"train.seed={seed}",
        f"log.run_dir={run_dir}",
        "checkpoint.resume=auto",
        "log.progress=false",
    ]


def plan(
    config_path: str | None,
    overrides: list[str],
    combos: list[Combination],
    seeds: list[int],
    out: Path,
) -> tuple[list[SweepRun], dict[str, str]]:
    """The runs of the sweep, and the combinations the config validation rejects (name → why)."""
    runs, rejected = [], {}
    for combo, seed in itertools.product(combos, seeds):
        if combo.name in rejected:
            continue
        run_dir = out / combo.name / f"seed-{seed}"
        try:
            config = load_config(config_path, run_overrides(overrides, combo, seed, run_dir))
        except ConfigError as e:
            rejected[combo.name] = str(e)
            continue
        runs.append(SweepRun(combo, seed, run_dir, config))
    return runs, rejected


def is_finished(run_dir: Path, config: Config) -> bool:
    """The run's end is complete at `train.steps` (its finished mark: the last checkpoint, the
    evaluation after RL, final model and report; a run killed before them is resumed, and
    finishes them). A finished run trained with other settings than `config` is refused
    (ConfigError): its results would be credited to the new ones."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None or finished_step(run_dir) != config.train.steps:
        return False
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    now = resume_view(dataclasses.asdict(config), dataclasses.asdict(config.algorithm_spec()))
    refused, applied = config_changes(resume_view(state["config"], saved_algorithm(state)), now)
    if refused or applied:
        raise ConfigError(
            f"{run_dir} finished under other settings ({', '.join(map(str, refused + applied))}); "
            "give the sweep a new --out, or the settings it was run with"
        )
    return True


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


@dataclass
class _Running:
    run: SweepRun
    process: subprocess.Popen
    log: IO
    started: float


def _launch(run: SweepRun, config_path: str | None, overrides: list[str], threads: int) -> _Running:
    """`advantage train` for one run in a subprocess with `threads` torch threads (its share
    of the cores); its output goes to RUN_DIR/train.log."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    args = run_overrides(overrides, run.combination, run.seed, run.run_dir)
    cmd = [
        sys.executable,
        "-m",
        "advantage",
        "train",
        *([config_path] if config_path else []),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = (run.run_dir / "train.log").open("a")
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return _Running(run, process, log, time.perf_counter())


def execute(
    todo: list[SweepRun],
    config_path: str | None,
    overrides: list[str],
    parallel: int,
    threads: int,
) -> dict[Path, str]:
    """Run `todo`, `parallel` at a time; {run_dir: status} as they end. Interrupting the sweep
    stops its runs (a rerun resumes them)."""
    results: dict[Path, str] = {}
    waiting, running = list(todo), []
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                run = waiting.pop(0)
                print(
                    f"start {run.combination.name} seed {run.seed} ({threads} threads)", flush=True
                )
                running.append(_launch(run, config_path, overrides, threads))
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                job.log.close()
                results[job.run.run_dir] = _ended(job)
            time.sleep(0.1)
    finally:
        for job in running:
            job.process.terminate()
            job.process.wait()
            job.log.close()
    return results


def _ended(job: _Running) -> str:
    run, seconds = job.run, time.perf_counter() - job.started
    code = job.process.returncode
    status = "finished" if code == 0 and is_finished(run.run_dir, run.config) else "failed"
    why = "" if status == "finished" else f" (exit code {code}; see {run.run_dir / 'train.log'})"
    print(f"{status}: {run.combination.name} seed {run.seed} in {seconds:.1f}s{why}", flush=True)
    return status


def run_sweep(
    config_path: str | None,
    presets: list[str] | None = None,
    grid: list[str] | None = None,
    seeds: int = 3,
    out: str | Path = "runs/sweep",
    overrides: list[str] | None = None,
    parallel: int = 1,
    cores: int | None = None,
    target: float = 0.9,
    command: str | None = None,
) -> dict:
    """Plan, skip what is finished, run the rest, write sweep.json and the comparison page.
    Returns the manifest (also in OUT/sweep.json)."""
    out, overrides = Path(out), list(overrides or [])
    check_at_least("--seeds", seeds, 1)
    check_at_least("--parallel", parallel, 1)
    check_at_least("--cores", cores, 1)
    if presets is None:  # the config's own preset
        presets = [load_config(config_path, overrides).algorithm]
    combos = combinations(presets, parse_grid(grid or []))
    runs, rejected = plan(config_path, overrides, combos, list(range(seeds)), out)
    for name, why in rejected.items():
        print(f"skipped {name}: the config validation rejects it: {why}")
    todo = [r for r in runs if not is_finished(r.run_dir, r.config)]
    finished = {r.run_dir for r in runs} - {r.run_dir for r in todo}
    threads = max(1, (cores or available_cores()) // max(1, parallel))
    print(f"{len(runs)} runs: {len(runs) - len(todo)} finished earlier, {len(todo)} to run")
    manifest = _manifest(command, config_path, overrides, presets, grid, seeds, out)
    manifest["configurations"] = _configurations(runs, finished, out)
    manifest["rejected"] = [{"name": k, "reason": v} for k, v in rejected.items()]
    manifest.update(parallel=parallel, threads_per_run=threads)
    _write_json(out / "sweep.json", manifest)
    for spec in sorted({r.config.model.name_or_path for r in todo}):
        model_path(spec)  # a built-in model is built (warm-started) here once, not by N runs
    results = execute(todo, config_path, overrides, parallel, threads)
    for entry in manifest["configurations"]:
        for run in entry["runs"]:
            run["status"] = results.get(out / run["run_dir"], run["status"])
    _write_json(out / "sweep.json", manifest)
    if any(r["status"] == "finished" for c in manifest["configurations"] for r in c["runs"]):
        print(f"comparison: {make_compare([out], out / 'compare', target=target)}")
    else:
        print("no run finished: no comparison page")
    return manifest


def _manifest(command, config_path, overrides, presets, grid, seeds, out) -> dict:
    return {
        "command": command,
        "config": config_path,
        "overrides": overrides,
        "presets": presets,
        "grid": list(grid or []),
        "seeds": list(range(seeds)),
        "finished_means": "the run's end is complete at train.steps (RUN_DIR/finished.json: "
        "after the last checkpoint, the evaluation after RL, the final model and the report)",
    }


def _configurations(runs: list[SweepRun], finished: set[Path], out: Path) -> list[dict]:
    """The manifest's configurations: name, overrides, preset and axis overrides (for the
    algorithm card), and each seed's run folder (relative to the sweep folder) and status
    (`finished`: the run folders found finished)."""
    configurations: dict[str, dict] = {}
    for run in runs:
        entry = configurations.setdefault(
            run.combination.name,
            {
                "name": run.combination.name,
                "overrides": list(run.combination.overrides),
                "algorithm": run.config.algorithm,
                "algo": {
                    k: v for k, v in dataclasses.asdict(run.config.algo).items() if v is not None
                },
                "runs": [],
            },
        )
        status = "finished" if run.run_dir in finished else "to run"
        entry["runs"].append(
            {"seed": run.seed, "run_dir": str(run.run_dir.relative_to(out)), "status": status}
        )
    return list(configurations.values())


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
