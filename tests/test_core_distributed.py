"""Batch statistics across 2 gloo processes equal 1 process on the concatenated batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advantage.core import (
    AdvantageInputs,
    compute_advantages,
    make_baseline,
    masked_whiten,
    resolve,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

B, T, G = 16, 7, 4


def _full_batch():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return dict(
        scores=torch.randn(B, generator=g) * 3 + 1,
        mask=torch.arange(T) < lengths.unsqueeze(-1),
        old_logprobs=-torch.rand(B, T, generator=g),
        ref_logprobs=-torch.rand(B, T, generator=g),
        values=torch.randn(B, T, generator=g),
        adv=torch.randn(B, T, generator=g),
    )


def _compute(batch, steps=2):
    out = {"whiten": masked_whiten(batch["adv"], batch["mask"])}
    inputs = AdvantageInputs(group_size=G, **{k: v for k, v in batch.items() if k != "adv"})
    for name in ("reinforce_pp", "reinforce_pp_baseline", "ppo", "grpo"):
        algo = resolve(name)
        out[name] = compute_advantages(
            inputs, algo, make_baseline(algo.baseline), kl_coef=algo.kl_coef
        ).advantages
    for name in ("ema", "moving_average"):  # stateful: two steps, the 2nd uses shifted scores
        baseline = make_baseline(name, ema_alpha=0.9)
        algo = resolve("reinforce", baseline=name)
        for step in range(steps):
            shifted = AdvantageInputs(**{**inputs.__dict__, "scores": inputs.scores + 2 * step})
            out[name] = compute_advantages(shifted, algo, baseline, kl_coef=algo.kl_coef).advantages
    return out


def _worker(rank, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    full = _full_batch()
    rows = slice(rank * B // world, (rank + 1) * B // world)  # whole groups per rank
    out = _compute({k: v[rows] for k, v in full.items()})
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _compute(_full_batch())
    for key, expected in single.items():
        got = torch.cat([parts[0][key], parts[1][key]])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=key)
    # and the local-only whitening differs, so the test can fail
    local = masked_whiten(_full_batch()["adv"][: B // 2], _full_batch()["mask"][: B // 2])
    assert not torch.allclose(local, single["whiten"][: B // 2])
