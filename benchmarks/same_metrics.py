"""Behaviour unchanged? Run the demo recipe with `train.deterministic=true` on this tree and on
another commit (a temporary `git worktree`), and compare their `metrics.jsonl` record by
record, wall-clock fields excluded (`time*`, `tokens_per_s/*`). Metrics that only one side
logs (added or removed since) are listed, not compared.

    .venv/bin/python benchmarks/same_metrics.py --ref 4790fb3 [key=value ...]

Both runs use this interpreter and the same warm-started model cache, on this machine, so the
comparison holds on any CPU. Exit code 0 when every record is equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WALL_CLOCK = ("time", "tokens_per_s/")


def demo_metrics(src: Path, run_dir: Path, overrides: list[str]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [
        sys.executable,
        "-m",
        "advantage",
        "demo",
        "train.deterministic=true",
        f"log.run_dir={run_dir}",
        "log.tensorboard=false",
        "log.report=false",
        *overrides,
    ]
    subprocess.run(cmd, env=env, check=True, cwd=src.parent, stdout=subprocess.DEVNULL)
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.append({k: v for k, v in record.items() if not k.startswith(WALL_CLOCK)})
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, help="the commit to compare with")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the demo recipe")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "ref"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), args.ref],
            check=True,
        )
        try:
            before = demo_metrics(tree / "src", Path(tmp) / "before", args.overrides)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
            )
        after = demo_metrics(ROOT / "src", Path(tmp) / "after", args.overrides)
    only = sorted({k for r in before for k in r} ^ {k for r in after for k in r})
    common = [
        (
            {k: v for k, v in a.items() if k not in only},
            {k: v for k, v in b.items() if k not in only},
        )
        for a, b in zip(before, after, strict=False)
    ]
    differing = [(a, b) for a, b in common if a != b]
    print(f"{len(before)} records at {args.ref}, {len(after)} here; {len(differing)} differ")
    if only:
        print(f"  logged on one side only (not compared): {', '.join(only)}")
    for a, b in differing[:3]:
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        print(
            f"  step {a.get('step')}: " + ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in keys)
        )
    return 0 if len(before) == len(after) and not differing else 1


if __name__ == "__main__":
    raise SystemExit(main())
