"""`advantage report RUN_DIR`: PNG plots of a run's metrics and one HTML page with the plots and
sample completions with their rewards per step. Reads `metrics.jsonl` and `samples.jsonl`."""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path

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
]

log = logging.getLogger("advantage")


def parse_jsonl(path: Path) -> tuple[list[tuple[str, dict]], list[int]]:
    """(line, record) of each JSON line of `path`, and the 1-based numbers of the lines that
    are not JSON objects (a write torn by a crash or a full disk) and were left out."""
    records, torn = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
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


def make_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report/index.html and its PNG plots; return the page's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        raise FileNotFoundError(
            f"{run_dir / 'metrics.jsonl'} is missing or empty: nothing to report"
        )
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for stem, title, patterns in PLOTS:
        series = _series(records, patterns)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for key, (x, y) in series.items():
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png")
        plt.close(fig)
        figures.append((stem, title))
    samples = read_jsonl(run_dir / "samples.jsonl")
    page = out / "index.html"
    page.write_text(_html(run_dir, records, figures, samples))
    return page


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
    imgs = "\n".join(
        f'<figure><img src="{stem}.png" alt="{html.escape(title)}"><figcaption>{html.escape(title)}</figcaption></figure>'
        for stem, title in figures
    )
    by_step: dict[int, list[dict]] = {}
    for s in samples:
        by_step.setdefault(s["step"], []).append(s)
    steps = sorted(by_step)
    shown = steps if len(steps) <= 20 else [*steps[:: max(1, len(steps) // 20)], steps[-1]]
    rows = "\n".join(
        f"<tr><td>{step}</td><td><code>{html.escape(str(s['prompt']))}</code></td>"
        f"<td><code>{html.escape(str(s['completion']))}</code></td><td>{s['reward']:.3f}</td></tr>"
        for step in dict.fromkeys(shown)
        for s in by_step[step]
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>advantage report: {html.escape(run_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; border: 1px solid #ddd; padding: 6px; }}
figcaption {{ font-size: 12px; color: #555; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; }}
</style></head><body>
<h1>advantage run: {html.escape(str(run_dir))}</h1>
<p>{html.escape(summary)}; last step {last.get("step")}.</p>
<div class="grid">
{imgs}
</div>
<h2>Sample completions</h2>
<table><tr><th>step</th><th>prompt</th><th>completion</th><th>reward</th></tr>
{rows}
</table>
<script>
// how many plots actually loaded (read by the test that renders this page in Chromium)
window.addEventListener("load", () => {{
  const imgs = [...document.images];
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesTotal = imgs.length;
}});
</script>
</body></html>
"""
