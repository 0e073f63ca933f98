"""`advantage compare RUN_OR_SWEEP_DIR ...`: one page that compares configurations over seeds
(`advantage sweep` writes it to SWEEP_DIR/compare/ at the end). Reads each run's `metrics.jsonl`
and the config saved with its newest checkpoint; plots and page come from `engine.report`.

- Plots: held-out accuracy and training reward (`reward/mean`) against steps and against wall
  time, KL and entropy against steps. A line is the mean over seeds at the steps every seed
  logged; the band around it goes from the lowest to the highest seed (min–max).
- Table (also OUT/table.md): final held-out accuracy, mean ± std over seeds (std with n - 1) and
  a 95% Student-t interval over seeds (mean ± t(0.975, n-1)·std/√n); steps and wall time until
  the held-out accuracy first reaches `target`, averaged over the seeds that reach it (the
  evaluation before training counts: a seed that starts there shows 0 steps); the wall
  time of the whole run; KL and entropy at the last step (means over seeds).
- Each configuration's algorithm card (`advantage.core.resolve(...).card()`).

Wall time is the cumulative `time/step` of the logged steps: training only (rollout, scoring,
log-probs, update), without start-up and evaluation, which are the same for every estimator.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..core.presets import resolve_axes
from ..engine.checkpoint import latest_checkpoint
from ..engine.report import figures_html, page_html, pyplot, read_jsonl, save_figure, series_style

METRICS = {"accuracy": "eval/accuracy", "reward": "reward/mean", "kl": "kl", "entropy": "entropy"}
# (file stem, title, metric, x axis)
PLOTS = [
    ("accuracy-steps", "Held-out accuracy", "accuracy", "step"),
    ("accuracy-time", "Held-out accuracy against wall time", "accuracy", "wall time (s)"),
    ("reward-steps", "Training reward (reward/mean)", "reward", "step"),
    ("reward-time", "Training reward against wall time", "reward", "wall time (s)"),
    ("kl-steps", "KL to the reference", "kl", "step"),
    ("entropy-steps", "Entropy (per token)", "entropy", "step"),
]
# t(0.975, df) for df = 1..30 (two-sided 95%); larger df use a Cornish–Fisher expansion
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass
class RunCurves:
    """One run as the page reads it."""

    run_dir: Path
    series: dict[str, dict[int, float]]
    """metric (METRICS' keys) → {step: value}; a step logged twice keeps its last value."""
    wall: dict[int, float]
    """step → seconds of training up to and including it (cumulative `time/step`; step 0 → 0)."""
    config: dict | None
    """The run's resolved config (saved with its newest checkpoint), if any."""

    @property
    def last_step(self) -> int:
        return max(self.wall)


def read_run(run_dir: Path) -> RunCurves:
    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'} is missing or empty")
    series: dict[str, dict[int, float]] = {name: {} for name in METRICS}
    wall, total = {0: 0.0}, 0.0
    for r in records:
        for name, key in METRICS.items():
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]):
                series[name][r["step"]] = float(r[key])
        if "time/step" in r and r["step"] not in wall:
            total += r["time/step"]
            wall[r["step"]] = total
    checkpoint = latest_checkpoint(run_dir)
    config = None
    if checkpoint is not None:
        config = json.loads((checkpoint / "trainer_state.json").read_text())["config"]
    return RunCurves(run_dir, series, wall, config)


@dataclass
class Configuration:
    name: str
    runs: list[RunCurves]
    card: str | None = None
    missing: list[str] = field(default_factory=list)
    """Run folders of the sweep not (yet) finished, left out."""


def algorithm_card(config: dict | None) -> str | None:
    """The card of a config's preset with its `algo.*` overrides (keys `algorithm`, `algo`;
    a run's whole config also says how its reference follows the policy, `model.ref_sync_*`)."""
    if not config:
        return None
    model = config.get("model", {})
    sync = model.get("ref_sync_steps", 0), model.get("ref_sync_alpha", 1.0)
    return resolve_axes(config["algorithm"], config.get("algo", {})).card(*sync)


def find_configurations(dirs: list[Path]) -> tuple[list[Configuration], list[dict]]:
    """The configurations in sweep folders (with sweep.json) and run folders; a run folder named
    `seed-N` belongs to the configuration of its parent folder. Also the rejected combinations."""
    found: dict[str, Configuration] = {}
    rejected: list[dict] = []
    for d in map(Path, dirs):
        if (d / "sweep.json").is_file():
            manifest = json.loads((d / "sweep.json").read_text())
            rejected += manifest.get("rejected", [])
            for entry in manifest["configurations"]:
                conf = found.setdefault(entry["name"], Configuration(entry["name"], []))
                for run in entry["runs"]:
                    if run.get("status") == "finished":
                        conf.runs.append(read_run(d / run["run_dir"]))
                    else:
                        conf.missing.append(f"{run['run_dir']} ({run.get('status')})")
                conf.card = conf.card or algorithm_card(entry)
        elif (d / "metrics.jsonl").is_file():
            name = d.parent.name if re.fullmatch(r"seed-\d+", d.name) else d.name
            found.setdefault(name, Configuration(name, [])).runs.append(read_run(d))
        else:
            raise FileNotFoundError(f"{d} holds neither sweep.json nor metrics.jsonl")
    for conf in found.values():
        conf.card = next((algorithm_card(r.config) for r in conf.runs if r.config), conf.card)
    return [c for c in found.values() if c.runs], rejected


@dataclass
class Summary:
    """One row of the table; accuracies are fractions, times seconds; None where undefined."""

    name: str
    seeds: int
    accuracy_mean: float | None
    accuracy_std: float | None
    accuracy_ci: tuple[float, float] | None
    reached: int
    steps_to_target: float | None
    seconds_to_target: float | None
    seconds: float
    kl: float | None
    entropy: float | None


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(conf: Configuration, target: float) -> Summary:
    runs, n = conf.runs, len(conf.runs)
    final = [r.series["accuracy"][max(r.series["accuracy"])] for r in runs if r.series["accuracy"]]
    std = statistics.stdev(final) if len(final) > 1 else None
    ci = None
    if std is not None:
        half = t_975(len(final) - 1) * std / math.sqrt(len(final))
        ci = (statistics.fmean(final) - half, statistics.fmean(final) + half)
    hits = []  # (step, seconds) at which each seed first reaches the target
    for r in runs:
        step = next((s for s, a in sorted(r.series["accuracy"].items()) if a >= target), None)
        if step is not None:
            hits.append((step, r.wall.get(step, r.wall[r.last_step])))
    at_end = {
        name: _mean([r.series[name][max(r.series[name])] for r in runs if r.series[name]])
        for name in ("kl", "entropy")
    }
    return Summary(
        name=conf.name,
        seeds=n,
        accuracy_mean=_mean(final),
        accuracy_std=std,
        accuracy_ci=ci,
        reached=len(hits),
        steps_to_target=_mean([h[0] for h in hits]),
        seconds_to_target=_mean([h[1] for h in hits]),
        seconds=statistics.fmean(r.wall[r.last_step] for r in runs),
        kl=at_end["kl"],
        entropy=at_end["entropy"],
    )


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


def table_rows(summaries: list[Summary], target: float) -> list[list[str]]:
    """The table as text cells, header first."""
    goal = f"{100 * target:g}%"
    rows = [
        [
            "configuration",
            "seeds",
            "final held-out accuracy (mean ± std)",
            "95% t-interval",
            f"steps to {goal}",
            f"wall time to {goal}",
            "wall time",
            "KL (end)",
            "entropy (end)",
        ]
    ]
    for s in summaries:
        pct = lambda v: None if v is None else 100 * v  # noqa: E731
        accuracy = _fmt(pct(s.accuracy_mean), ".1f")
        if s.accuracy_std is not None:
            accuracy += f" ± {100 * s.accuracy_std:.1f}"
        ci = "—" if s.accuracy_ci is None else "[{:.1f}, {:.1f}]".format(*map(pct, s.accuracy_ci))
        rows.append(
            [
                s.name,
                str(s.seeds),
                accuracy + ("%" if s.accuracy_mean is not None else ""),
                ci + ("%" if s.accuracy_ci else ""),
                f"{_fmt(s.steps_to_target, '.1f')} ({s.reached}/{s.seeds})",
                f"{_fmt(s.seconds_to_target, '.1f', ' s')} ({s.reached}/{s.seeds})",
                _fmt(s.seconds, ".1f", " s"),
                _fmt(s.kl, ".4f"),
                _fmt(s.entropy, ".3f"),
            ]
        )
    return rows


def table_markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines) + "\n"


def band(runs: list[RunCurves], metric: str, by_time: bool) -> tuple[list[float], ...]:
    """(x, mean, low, high) over seeds at the steps every seed logged; x is the step, or the
    mean over seeds of the wall time at that step."""
    steps = sorted(set.intersection(*(set(r.series[metric]) for r in runs)))
    if by_time:
        steps = [s for s in steps if all(s in r.wall for r in runs)]
    values = [[r.series[metric][s] for r in runs] for s in steps]
    x = [statistics.fmean(r.wall[s] for r in runs) if by_time else s for s in steps]
    return (
        x,
        [statistics.fmean(v) for v in values],
        [min(v) for v in values],
        [max(v) for v in values],
    )


def plot_comparison(confs: list[Configuration], out: Path) -> list[tuple[str, str]]:
    """The PNGs of PLOTS that have data; returns their (stem, caption)."""
    plt = pyplot()
    figures = []
    for stem, title, metric, xlabel in PLOTS:
        bands = [(c.name, band(c.runs, metric, xlabel != "step")) for c in confs]
        bands = [(name, b) for name, b in bands if b[0]]
        if not bands:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
        for i, (name, (x, mean, low, high)) in enumerate(bands):
            style = series_style(i, len(bands), len(x))
            ax.plot(x, mean, label=name, **style)
            ax.fill_between(x, low, high, color=style["color"], alpha=0.15, linewidth=0)
        save_figure(fig, ax, out / f"{stem}.png", title, xlabel)
        figures.append((stem, f"{title}: mean over seeds, band min–max"))
    return figures


def make_compare(
    dirs: list[str | Path], out: str | Path | None = None, target: float = 0.9
) -> Path:
    """Write OUT/index.html, OUT/table.md and the PNGs (OUT defaults to DIRS[0]/compare)."""
    confs, rejected = find_configurations([Path(d) for d in dirs])
    if not confs:
        raise FileNotFoundError(f"no finished runs found in {', '.join(map(str, dirs))}")
    out = Path(out) if out is not None else Path(dirs[0]) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows([summarize(c, target) for c in confs], target)
    (out / "table.md").write_text(table_markdown(rows))
    figures = plot_comparison(confs, out)
    page = out / "index.html"
    page.write_text(_html(confs, rows, figures, rejected, out, target))
    return page


def _html(confs, rows, figures, rejected, out: Path, target: float) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body_rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
    )
    cards = "\n".join(
        f"<h3>{html.escape(c.name)}</h3><pre>{html.escape(c.card or 'no saved config')}</pre>"
        f"<p>runs: {_run_links(c, out)}</p>"
        + (
            f"<p>left out (not finished): {html.escape(', '.join(c.missing))}</p>"
            if c.missing
            else ""
        )
        for c in confs
    )
    skipped = "".join(
        f"<li><b>{html.escape(r['name'])}</b>: {html.escape(r['reason'])}</li>" for r in rejected
    )
    body = f"""<h1>advantage: comparison of {len(confs)} configurations</h1>
<p>Lines are the mean over seeds, bands go from the lowest to the highest seed (min–max).
Accuracy is the held-out accuracy (greedy); the final one is the evaluation after the last step.
± is the standard deviation over seeds (n - 1); the 95% interval is a Student-t interval over
seeds (mean ± t(0.975, n-1)·std/√n). Steps and wall time to {100 * target:g}% average the seeds
that reach it (count in brackets; the evaluation before training counts: 0 steps when a seed
starts there). Wall time is the cumulative <code>time/step</code>: training
only, without start-up and evaluation.</p>
<table><tr>{head}</tr>
{body_rows}
</table>
{figures_html(figures)}
{f"<h2>Skipped combinations</h2><ul>{skipped}</ul>" if skipped else ""}
<h2>Algorithm cards</h2>
{cards}"""
    return page_html("advantage comparison", body)


def _run_links(conf: Configuration, out: Path) -> str:
    links = []
    for r in conf.runs:
        report = r.run_dir / "report" / "index.html"
        label = html.escape(r.run_dir.name)
        if report.is_file():
            links.append(f'<a href="{html.escape(os.path.relpath(report, out))}">{label}</a>')
        else:
            links.append(label)
    return ", ".join(links)
