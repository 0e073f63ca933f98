"""`advantage report RUN_DIR`: PNG plots of a run's metrics and one HTML page with the plots and
sample completions with their rewards per step. Reads `metrics.jsonl` and `samples.jsonl`.

The plotting and page helpers (`series_style`, `save_figure`, `figures_html`, `page_html`) are
shared with the comparison page of several runs (`advantage.stages.compare`)."""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path

from .configlib import ConfigError

# (file stem, title, metric keys; a key ending in "/*" takes every metric under that prefix)
PLOTS = [
    ("reward", "Reward (mean and per function)", ["reward/mean", "reward/*"]),
    ("eval", "Held-out evaluation", ["eval/*"]),
    ("kl", "KL to the reference", ["kl", "kl_loss", "kl_coef"]),
    ("entropy", "Entropy (per token)", ["entropy"]),
    (
        "length",
        "Completion length and clipped ratio",
        ["completion/length", "completion/clipped_ratio"],
    ),
    ("clip", "Clip fractions", ["clip_frac/*"]),
    ("advantages", "Advantage std and zero-std groups", ["advantages/std", "frac_zero_std_groups"]),
    ("loss", "Losses", ["loss", "loss/policy", "loss/value"]),
    ("speed", "Step time (s)", ["time/step", "time/rollout", "time/update"]),
    ("episode-length", "Episode length (tokens after the prompt)", ["episode/length"]),
    (
        "episode-turns",
        "Turns and tool calls per episode",
        ["episode/turns", "tools/calls_per_episode"],
    ),
    (
        "episode-rates",
        "Episodes: tool-call rate, environment token share, truncated, tool errors",
        [
            "tools/call_rate",
            "episode/env_token_share",
            "episode/truncated",
            "tools/errors",
            "tools/timeouts",
            "eval/tool_call_rate",
        ],
    ),
]

log = logging.getLogger("advantage")


def parse_jsonl(path: Path) -> tuple[list[tuple[str, dict]], list[int]]:
    """(line, record) of each JSON line of `path`, and the 1-based numbers of the lines that
    are not JSON objects (a write torn by a crash or a full disk) and were left out."""
    records, torn = [], []
    for number, line in enumerate(path.read_text(errors="replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and "step" in record:
            records.append((line, record))
        else:
            torn.append(number)
    return records, torn


def _reward_text(reward: float | None) -> str:
    return "unscored" if reward is None else f"{reward:.3f}"


def lines_text(numbers: list[int]) -> str:
    """ "line 7" / "lines 7, 9"."""
    return f"line{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}"


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics or samples file; lines torn by a crash are skipped, saying so."""
    if not path.is_file():
        return []
    records, torn = parse_jsonl(path)
    if torn:
        log.warning(f"{path}: skipped {lines_text(torn)}, not valid JSON (a torn write)")
    return [record for _, record in records]


def logged_evaluations(run_dir: Path) -> tuple[dict, dict]:
    """(the first, the last) held-out evaluation in a run's metrics.jsonl, their `eval/*` keys as
    `Trainer.evaluate` returned them ({} when none)."""
    evals = [
        {k: v for k, v in r.items() if k.startswith("eval/")}
        for r in read_jsonl(Path(run_dir) / "metrics.jsonl")
        if "eval/accuracy" in r
    ]
    return (evals[0], evals[-1]) if evals else ({}, {})


def _series(records: list[dict], patterns: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    keys: list[str] = []
    for pattern in patterns:
        if pattern.endswith("/*"):
            prefix = pattern[:-1]
            found = sorted({k for r in records for k in r if k.startswith(prefix)})
            keys += [
                k
                for k in found
                if k not in keys and k not in ("reward/std", "reward/unscored_frac")
            ]
        elif any(pattern in r for r in records) and pattern not in keys:
            keys.append(pattern)
    out = {}
    for key in keys:
        points = [
            (r["step"], r[key])
            for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        if points:
            out[key] = ([p[0] for p in points], [p[1] for p in points])
    return out


# Series of one plot are told apart by colour, line style and marker together, and the first
# is drawn thickest and lowest: two identical series (`eval/accuracy` and `eval/reward` on a
# 0/1 reward) then show as a thin line inside a thick one, with their markers side by side.
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f")
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "x", "P", "*")


def series_style(i: int, n_series: int, n_points: int) -> dict:
    """Matplotlib keyword arguments of series `i` (of `n_series`) with `n_points` points."""
    every = max(1, n_points // 12)  # about 12 markers a line, staggered between the series
    return dict(
        color=COLORS[i % len(COLORS)],
        linestyle=LINESTYLES[i % len(LINESTYLES)],
        linewidth=3.4 - 2.2 * i / max(1, n_series - 1),
        alpha=0.55 if i == 0 and n_series > 1 else 1.0,
        marker=MARKERS[i % len(MARKERS)],
        markersize=max(3.0, 8.0 - 1.5 * i),
        markerfacecolor="none" if i % 2 else COLORS[i % len(COLORS)],
        markevery=(i * every // max(1, n_series), every),
        zorder=2 + i,
    )


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, ax, path: Path, title: str, xlabel: str) -> None:
    """Title, axis label, grid and legend, then write the PNG and free the figure."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if xlabel == "step":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)


def figures_html(figures: list[tuple[str, str]]) -> str:
    """A wrapping grid of `(file stem, caption)` PNGs beside the page."""
    cells = "\n".join(
        f'<figure><img src="{stem}.png" alt="{html.escape(title)}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for stem, title in figures
    )
    return f'<div class="grid">\n{cells}\n</div>'


def page_html(title: str, body: str) -> str:
    """A self-contained page: the report's style, and a script that counts the images that
    loaded (read by the tests that render pages in Chromium)."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; border: 1px solid #ddd; padding: 6px; }}
figcaption {{ font-size: 12px; color: #555; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; }}
pre {{ font-size: 12px; background: #f6f6f6; padding: 6px; }}
.turn {{ margin: 2px 0; }} .turn.tool {{ color: #0b5; }} .turn.user {{ color: #05b; }}
</style></head><body>
{body}
<script>
// how many plots actually loaded (read by the tests that render pages in Chromium)
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesTotal = imgs.length;
}});
</script>
</body></html>
"""


def make_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report/index.html and its PNG plots; return the page's path."""
    plt = pyplot()
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        raise ConfigError(  # one line from the command line, not a traceback
            f"{run_dir / 'metrics.jsonl'} holds no step record (empty, torn or not ours): "
            "nothing to report"
        )
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for stem, title, patterns in PLOTS:
        series = _series(records, patterns)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for i, (key, (x, y)) in enumerate(series.items()):
            ax.plot(x, y, label=key, **series_style(i, len(series), len(x)))
        save_figure(fig, ax, out / f"{stem}.png", title, "step")
        figures.append((stem, title))
    samples = read_jsonl(run_dir / "samples.jsonl")
    page = out / "index.html"
    page.write_text(_html(run_dir, records, figures, samples))
    return page


def _completion_html(sample: dict) -> str:
    """A completion; an episode turn by turn: the model's turns, each tool call's result."""
    if not sample.get("conversation"):
        return f"<code>{html.escape(str(sample['completion']))}</code>"
    turns = []
    for m in sample["conversation"]:
        who = m.get("role", "?") + (f" {m['name']}" if m.get("name") else "")
        turns.append(
            f"<div class='turn {html.escape(m.get('role', ''))}'><b>{html.escape(who)}</b> "
            f"<code>{html.escape(str(m.get('content', '')))}</code></div>"
        )
    return "".join(turns)


def _html(
    run_dir: Path, records: list[dict], figures: list[tuple[str, str]], samples: list[dict]
) -> str:
    last = records[-1]
    evals = [r for r in records if "eval/accuracy" in r]
    summary = f"{len([r for r in records if 'reward/mean' in r])} logged steps"
    if len(evals) >= 2:
        summary += (
            f"; held-out accuracy {100 * evals[0]['eval/accuracy']:.1f}% → "
            f"{100 * evals[-1]['eval/accuracy']:.1f}%"
        )
    by_step: dict[int, list[dict]] = {}
    for s in samples:
        by_step.setdefault(s["step"], []).append(s)
    steps = sorted(by_step)
    shown = steps if len(steps) <= 20 else [*steps[:: max(1, len(steps) // 20)], steps[-1]]
    rows = "\n".join(
        f"<tr><td>{step}</td><td><code>{html.escape(str(s['prompt']))}</code></td>"
        f"<td>{_completion_html(s)}</td><td>{_reward_text(s['reward'])}</td></tr>"
        for step in dict.fromkeys(shown)
        for s in by_step[step]
    )
    body = f"""<h1>advantage run: {html.escape(str(run_dir))}</h1>
<p>{html.escape(summary)}; last step {last.get("step")}.</p>
{figures_html(figures)}
<h2>Sample completions</h2>
<table><tr><th>step</th><th>prompt</th><th>completion</th><th>reward</th></tr>
{rows}
</table>"""
    return page_html(f"advantage report: {run_dir.name}", body)
