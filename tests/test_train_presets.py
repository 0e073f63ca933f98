"""Every preset trains for 3 steps on the tiny Qwen2 with finite losses and moving weights."""

import math

import pytest
import torch

from advantage.core import PRESETS
from advantage.rl.config import load_config
from advantage.rl.trainer import Trainer
from helpers import length_reward, small_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_three_steps(preset, run_dir):
    cfg = load_config(None, small_config(run_dir, f"algorithm={preset}"))
    trainer = Trainer(cfg, reward_funcs=[length_reward])
    before = {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}
    result = trainer.fit()
    assert len(result.metrics) == 3
    for m in result.metrics:
        assert math.isfinite(m["loss/policy"]), m
        assert math.isfinite(m["reward/mean"]) and math.isfinite(m["entropy"])
        assert m["skipped_updates"] == 0
        if cfg.algorithm_spec().uses_critic:
            assert math.isfinite(m["loss/value"])
    after = trainer.policy.state_dict()
    moved = sum(not torch.equal(before[k], after[k]) for k in before)
    assert moved > len(before) // 2, f"{preset}: only {moved} of {len(before)} tensors changed"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_axis_overrides_and_options_run(run_dir):
    """Clip-higher, dual clip, entropy bonus, adaptive KL, μ = 2 epochs × 2 minibatches with
    micro-batches, truncation masking, dynamic sampling and a synced reference, all at once."""
    cfg = load_config(
        None,
        small_config(
            run_dir,
            "algorithm=reinforce_pp_baseline",
            "algo.clip_high=0.28",
            "algo.dual_clip=3.0",
            "algo.entropy_coef=0.01",
            "algo.kl_controller=adaptive",
            "algo.kl_target=0.1",
            "train.epochs=2",
            "train.minibatches=2",
            "train.micro_batch_size=2",
            "rollout.mask_truncated=true",
            "algo.dynamic_sampling=true",
            "model.ref_sync_steps=1",
            "model.ref_sync_alpha=0.5",
        ),
    )
    trainer = Trainer(cfg, reward_funcs=[length_reward])
    result = trainer.fit()
    last = result.metrics[-1]
    assert last["kl_coef"] != 0.01  # the adaptive controller moved β
    assert "dynamic_sampling/tries" in last and "clip_frac/dual" in last
    for a, b in zip(trainer.ref.parameters(), trainer.policy.parameters(), strict=True):
        assert not torch.equal(a, b)  # α = 0.5: halfway, not a copy


def test_logged_lr_and_beta_are_the_ones_the_step_used(tmp_path):
    # an independent user's probe: the logged lr was the next step's (the schedule had moved)
    cfg = load_config(
        None,
        small_config(tmp_path / "run", "train.warmup_steps=2", "train.lr_schedule=linear",
                     "algo.kl_controller=adaptive", "algo.kl_target=1e-6", "algo.kl_coef=0.01"),
    )  # fmt: skip
    metrics = Trainer(cfg, reward_funcs=[length_reward]).fit().metrics
    # warm-up (step + 1)/2, then linear from 1 to 0 over the one step left: 5e-4, 1e-3, 1e-3
    assert [m["lr"] for m in metrics] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert metrics[0]["kl_coef"] == 0.01 and metrics[1]["kl_coef"] < 0.01  # β before it moved
