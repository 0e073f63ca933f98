"""Peak memory of LoRA against full fine-tuning (GRPO, β = 0.04, the demo's work per step):
each run in its own process, peak RSS read from the kernel (ru_maxrss).

    .venv/bin/python benchmarks/lora_memory.py [--sizes tiny small] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, time
from advantage.rl.config import load_config
from advantage.rl.trainer import Trainer
trainer = Trainer(load_config(None, sys.argv[1:]))
start = time.perf_counter()
result = trainer.fit()
seconds = (time.perf_counter() - start) / len(result.metrics)
# bytes of training state: distinct parameter tensors (policy + reference), gradients, optimizer state
tensors = {}
for model in (trainer.policy, trainer.ref):
    for p in ([] if model is None else model.parameters()):
        tensors[p.data_ptr()] = p.numel() * p.element_size()
        if p.grad is not None:
            tensors[p.grad.data_ptr()] = p.grad.numel() * p.grad.element_size()
for state in trainer.optimizer.state.values():
    for t in state.values():
        if hasattr(t, "data_ptr") and t.dim() > 0:
            tensors[t.data_ptr()] = t.numel() * t.element_size()
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "state_mb": sum(tensors.values()) / 2**20, "s_per_step": seconds}))
"""


def run(size: str, lora: bool, steps: int) -> dict:
    overrides = [
        f"model.name_or_path=builtin:{size}-random",
        "data.train=builtin:reverse",
        f"log.run_dir={tempfile.mkdtemp()}",
        "log.progress=false",
        "log.tensorboard=false",
        "log.report=false",
        "eval.size=0",
        "checkpoint.save_final=false",
        "rollout.prompts_per_step=8",
        "rollout.num_generations=8",
        "rollout.max_new_tokens=16",
        f"train.steps={steps}",
        "train.lr=1e-4",
        "algo.kl_coef=0.04",
    ]
    if lora:
        overrides.append("model.lora={r: 8, lora_alpha: 16}")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *overrides], capture_output=True, text=True, timeout=3600
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(
        "| model | training | peak RSS MB | LoRA / full | training state MB (weights, reference, grads, AdamW) | LoRA / full | s/step |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        full, lora = run(size, False, args.steps), run(size, True, args.steps)
        for name, r in (
            ("full fine-tuning (+ reference copy)", full),
            ("LoRA r=8 (reference = adapters off)", lora),
        ):
            print(
                f"| {size} | {name} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / full['peak_rss_mb']:.2f} | "
                f"{r['state_mb']:.1f} | {r['state_mb'] / full['state_mb']:.2f} | {r['s_per_step']:.2f} |"
            )


if __name__ == "__main__":
    main()
