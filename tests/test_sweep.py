"""`advantage sweep` and `advantage compare`: a tiny sweep runs, writes its manifest, runs and
comparison page; a rerun trains nothing and writes the same table; an unfinished run resumes;
the table equals a hand computation from the runs' metrics.jsonl; the page renders in Chromium.
Also: every series of a report plot has its own style, and evaluating changes no training."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advantage.cli import main
from advantage.engine.configlib import ConfigError
from advantage.engine.report import series_style
from advantage.rl.config import load_config
from advantage.rl.trainer import Trainer
from advantage.stages.compare import (
    Configuration,
    RunCurves,
    find_configurations,
    summarize,
    t_975,
)
from advantage.stages.sweep import combinations, parse_grid
from helpers import rendered_page, small_config

ROOT = Path(__file__).resolve().parents[1]
# 2 presets × 2 seeds × 3 steps on the warm-started tiny model (held-out accuracy is not 0);
# kl_controller=adaptive without a kl_target is rejected by the config validation
CONFIG = """\
model: {name_or_path: builtin:tiny-reverse}
data: {train: builtin:reverse, eval: builtin:reverse:eval}
rollout: {num_generations: 4, prompts_per_step: 2, max_new_tokens: 6}
train: {steps: 3, lr: 1.0e-3}
eval: {size: 8, every: 2}
log: {tensorboard: false}
checkpoint: {every: 2, keep: 2, save_final: false}
"""
SWEEP = ["--presets", "grpo", "rloo", "--grid", "kl_controller=fixed,adaptive", "--seeds", "2"]
SWEEP += ["--parallel", "2", "--cores", "2", "train.lr=2e-3"]  # 1 thread per run
NAMES = ["grpo__kl_controller-fixed", "rloo__kl_controller-fixed"]


def sweep(config: Path, out: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "advantage", "sweep", str(config), *SWEEP, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, time.perf_counter() - start


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    config = root / "tiny.yaml"
    config.write_text(CONFIG)
    done, seconds = sweep(config, root / "out")
    print(f"tiny sweep (4 runs, 2 at once): {seconds:.1f}s")
    return config, root / "out", done.stdout, seconds


def test_grid_axes_and_combination_names():
    grid = parse_grid(["scope=group,batch", "train.lr=1e-4,3e-4", "kl_coef=0"])
    assert grid == {
        "algo.scope": ["group", "batch"],
        "train.lr": ["1e-4", "3e-4"],
        "algo.kl_coef": ["0"],
    }
    combos = combinations(["grpo", "rloo"], grid)
    assert [c.name for c in combos][:2] == [
        "grpo__scope-group__train.lr-1e-4",
        "grpo__scope-group__train.lr-3e-4",
    ]
    assert len(combos) == 8
    # an axis of one value is a setting of every run, not part of the name
    assert combos[0].overrides == (
        "algorithm=grpo",
        "algo.kl_coef=0",
        "algo.scope=group",
        "train.lr=1e-4",
    )
    with pytest.raises(ConfigError, match="not an algorithm axis"):
        parse_grid(["scoop=group,batch"])


def test_overrides_after_the_options_reach_the_runs(monkeypatch):
    import advantage.stages.sweep as sweep_module

    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs, path=path)
        return {"configurations": []}

    monkeypatch.setattr(sweep_module, "run_sweep", fake)
    argv = ["sweep", "c.yaml", "a.b=1", "--presets", "grpo", "rloo", "train.steps=3"]
    assert main([*argv, "--seeds", "2", "log.every=2"]) == 0
    assert seen["path"] == "c.yaml" and seen["presets"] == ["grpo", "rloo"]
    assert seen["overrides"] == ["a.b=1", "train.steps=3", "log.every=2"]
    assert seen["command"].startswith("advantage sweep c.yaml a.b=1 --presets")


@pytest.mark.slow
def test_sweep_writes_manifest_runs_and_comparison(swept):
    _, out, stdout, _ = swept
    manifest = json.loads((out / "sweep.json").read_text())
    assert (
        manifest["command"].startswith("advantage sweep ")
        and "--presets grpo rloo" in (manifest["command"])
    )
    assert manifest["seeds"] == [0, 1] and manifest["threads_per_run"] == 1
    assert [c["name"] for c in manifest["configurations"]] == NAMES
    assert {r["name"] for r in manifest["rejected"]} == {
        "grpo__kl_controller-adaptive",
        "rloo__kl_controller-adaptive",
    }
    assert all("kl_target" in r["reason"] for r in manifest["rejected"])
    assert "skipped grpo__kl_controller-adaptive" in stdout
    for entry in manifest["configurations"]:
        assert entry["overrides"][-1] == "algo.kl_controller=fixed"
        for run in entry["runs"]:
            run_dir = out / run["run_dir"]
            assert run["status"] == "finished" and run_dir.name == f"seed-{run['seed']}"
            assert (run_dir / "report" / "index.html").is_file()
            assert (run_dir / "checkpoints" / "step-000003" / "trainer_state.json").is_file()
            saved = json.loads((run_dir / "checkpoints/step-000003/trainer_state.json").read_text())
            assert saved["config"]["train"]["seed"] == run["seed"]
            assert saved["config"]["train"]["lr"] == 2e-3  # the override after the options
            assert saved["config"]["algorithm"] == entry["algorithm"]
    pngs = sorted(p.name for p in (out / "compare").glob("*.png"))
    assert len(pngs) == 6 and "accuracy-time.png" in pngs
    page = (out / "compare" / "index.html").read_text()
    assert "algorithm: rloo" in page and "leave_one_out" in page  # the cards


@pytest.mark.slow
def test_rerun_trains_nothing_and_writes_the_same_table(swept):
    config, out, _, first_seconds = swept
    metrics = sorted(out.glob("*/seed-*/metrics.jsonl"))
    assert len(metrics) == 4
    before = {p: (p.stat().st_mtime_ns, p.read_text()) for p in metrics}
    table = (out / "compare" / "table.md").read_text()
    done, seconds = sweep(config, out)
    print(f"rerun: {seconds:.1f}s (first run {first_seconds:.1f}s)")
    assert "4 runs: 4 finished earlier, 0 to run" in done.stdout
    assert "start " not in done.stdout
    assert {p: (p.stat().st_mtime_ns, p.read_text()) for p in metrics} == before
    assert (out / "compare" / "table.md").read_text() == table


def test_rerun_with_other_settings_is_refused_and_changes_nothing(swept):
    # an adversarial probe: a rerun with other overrides credited the old runs to them
    config, out, _, _ = swept
    manifest = (out / "sweep.json").read_text()
    done = subprocess.run(
        [sys.executable, "-m", "advantage", "sweep", str(config), *SWEEP, "train.lr=0.5",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("error: "), done.stderr[-2000:]
    assert "finished under other settings (train.lr: 0.002 → 0.5)" in done.stderr
    assert (out / "sweep.json").read_text() == manifest


@pytest.mark.parametrize(("flag", "value"), [("--parallel", "0"), ("--seeds", "0")])
def test_sweep_counts_below_one_are_refused(flag, value, capsys):
    # an adversarial probe: --parallel 0 waited forever, --seeds 0 ran nothing and exited 0
    assert main(["sweep", "--presets", "grpo", flag, value, "--out", "/nonexistent/x"]) == 2
    assert capsys.readouterr().err == f"error: {flag} must be >= 1, got 0\n"


@pytest.mark.slow
def test_unfinished_run_resumes_from_its_checkpoint(swept):
    config, out, _, _ = swept
    run_dir = out / NAMES[1] / "seed-1"
    complete = (run_dir / "metrics.jsonl").read_text().splitlines()
    # as if killed after the checkpoint of step 2: the step-3 checkpoint, the finished mark and
    # the records are gone
    subprocess.run(["rm", "-r", str(run_dir / "checkpoints" / "step-000003")], check=True)
    (run_dir / "finished.json").unlink()
    (run_dir / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in complete if json.loads(line)["step"] <= 2)
    )
    done, _ = sweep(config, out)
    assert "4 runs: 3 finished earlier, 1 to run" in done.stdout
    assert f"start {NAMES[1]} seed 1" in done.stdout
    assert "resumed from" in (run_dir / "train.log").read_text()
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # step 3 and the final evaluation, once each
    assert [r["step"] for r in resumed] == [json.loads(line)["step"] for line in complete]
    assert "reward/mean" in resumed[-2] and "eval/accuracy" in resumed[-1]


def hand_row(run_dirs: list[Path]) -> dict:
    """The table's numbers, from metrics.jsonl alone."""
    finals, kls, entropies, walls = [], [], [], []
    for d in run_dirs:
        records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        finals.append([r["eval/accuracy"] for r in records if "eval/accuracy" in r][-1])
        kls.append([r["kl"] for r in records if "kl" in r][-1])
        entropies.append([r["entropy"] for r in records if "entropy" in r][-1])
        walls.append(sum(r["time/step"] for r in records if "time/step" in r))
    mean = sum(finals) / len(finals)
    std = math.sqrt(sum((a - mean) ** 2 for a in finals) / (len(finals) - 1))
    half = 12.706 * std / math.sqrt(2)  # t(0.975, 1 degree of freedom) · s / √n
    return dict(
        mean=mean,
        std=std,
        ci=(mean - half, mean + half),
        kl=sum(kls) / 2,
        entropy=sum(entropies) / 2,
        seconds=sum(walls) / 2,
    )


@pytest.mark.slow
def test_compare_table_equals_hand_computation(swept):
    _, out, _, _ = swept
    confs, _ = find_configurations([out])
    assert [c.name for c in confs] == NAMES
    table = (out / "compare" / "table.md").read_text()
    for conf in confs:
        want = hand_row([out / conf.name / "seed-0", out / conf.name / "seed-1"])
        got = summarize(conf, target=0.9)
        assert got.seeds == 2
        assert got.accuracy_mean == pytest.approx(want["mean"])
        assert got.accuracy_std == pytest.approx(want["std"])
        assert got.accuracy_ci == pytest.approx(want["ci"])
        assert got.kl == pytest.approx(want["kl"])
        assert got.entropy == pytest.approx(want["entropy"])
        assert got.seconds == pytest.approx(want["seconds"])
        cells = f"| {conf.name} | 2 | {100 * want['mean']:.1f} ± {100 * want['std']:.1f}% | "
        assert cells in table
        assert f"| {want['kl']:.4f} | {want['entropy']:.3f} |" in table
    # steps to a target every seed reaches at step 0 (accuracy ≥ 0): 0 steps, 0 seconds
    zero = summarize(confs[0], target=0.0)
    assert (zero.reached, zero.steps_to_target, zero.seconds_to_target) == (2, 0, 0.0)


def test_t_quantiles():
    assert t_975(1) == 12.706 and t_975(2) == 4.303 and t_975(30) == 2.042
    assert t_975(60) == pytest.approx(2.000, abs=1e-3) and t_975(10**6) == pytest.approx(1.96, 1e-3)
    # a 3-seed interval by hand: mean 0.625, s = 0.125, t(0.975, 2) = 4.303,
    # half-width 4.303 · 0.125 / √3 = 0.31054
    runs = [
        RunCurves(Path(f"s{i}"), {"accuracy": {0: 0.0, 10: a}, "kl": {}, "entropy": {}},
                  {0: 0.0, 10: 1.0}, None)
        for i, a in enumerate([0.5, 0.75, 0.625])
    ]  # fmt: skip
    summary = summarize(Configuration("c", runs), target=1.0)
    assert summary.accuracy_mean == pytest.approx(0.625)
    assert summary.accuracy_std == pytest.approx(0.125)
    assert summary.accuracy_ci == pytest.approx((0.625 - 0.31054, 0.625 + 0.31054), abs=1e-5)


@pytest.mark.slow
def test_compare_page_renders_with_every_image(swept, tmp_path):
    _, out, _, _ = swept
    # `advantage compare` of run folders: seed-N folders group under their parent's name
    runs = sorted(str(p) for p in out.glob("*/seed-*"))
    assert main(["compare", *runs, "--out", str(tmp_path / "cmp")]) == 0
    assert [c.name for c in find_configurations([Path(r) for r in runs])[0]] == NAMES
    for page in (out / "compare" / "index.html", tmp_path / "cmp" / "index.html"):
        dom, loaded, total = rendered_page(page, tmp_path / "chrome")
        assert loaded == total == 6
        assert "95% t-interval" in dom and "algorithm: grpo" in dom


def test_every_series_of_a_plot_has_its_own_style():
    styles = [series_style(i, 4, 50) for i in range(4)]
    for key in ("color", "linestyle", "marker", "markevery"):
        assert len({str(s[key]) for s in styles}) == 4, key
    # drawn thickest first, thinner ones above: an identical series stays visible
    assert [s["linewidth"] for s in styles] == sorted(s["linewidth"] for s in styles)[::-1]
    assert [s["zorder"] for s in styles] == [2, 3, 4, 5]


@pytest.mark.slow
def test_evaluating_changes_no_training_metric(tmp_path):
    """Evaluation runs on a forked RNG: evaluating every step leaves every training metric as
    it is without evaluation (why the demo recipe can evaluate every 10 steps)."""
    out = []
    for every in (0, 1):
        cfg = load_config(
            None,
            small_config(
                tmp_path / f"every-{every}",
                "train.deterministic=true",
                "log.report=false",
                "data.eval=builtin:reverse:eval",
                "eval.size=4",
                f"eval.every={every}",
                model="builtin:tiny-reverse",
            ),
        )
        result = Trainer(cfg).fit()
        out.append(
            [
                {k: v for k, v in m.items() if not k.startswith(("time", "tokens_per_s", "eval/"))}
                for m in result.metrics
            ]
        )
    assert out[0] == out[1]
    assert any("eval/accuracy" in m for m in result.metrics)  # the second run did evaluate
