"""2 processes with P/2 prompts each equal 1 process with P prompts (identical rollouts):
advantages, loss, gradients and updated weights, for grpo, reinforce_pp and ppo, under DDP and
FSDP2 (gloo on CPU)."""

import os
import socket
import string
import time

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

P, G = 4, 4
# statistics over the whole batch: 2 processes log what 1 does (not a mean of per-rank values)
GLOBAL_METRICS = ("reward/mean", "reward/std", "reward/length_reward", "loss/policy", "entropy",
                  "approx_kl", "clip_frac/low", "clip_frac/high", "loss/value", "kl")  # fmt: skip


def _fixed_generate(self, prompts, num_generations, params):
    """Completions that depend only on the prompt and the completion index: every process
    partition sees the same rollouts."""
    from advantage.engine.rollout import pad_completions, pad_prompts
    from advantage.engine.rollout.base import Rollout

    completions = []
    for p in prompts:
        for j in range(num_generations):
            g = torch.Generator().manual_seed(sum(p) * 131 + j)
            n = int(torch.randint(2, params.max_new_tokens + 1, (1,), generator=g))
            ids = torch.randint(4, 20, (n,), generator=g).tolist()
            completions.append([*ids[:-1], self.tokenizer.eos_token_id] if j % 2 else ids)
    p_ids, p_mask = pad_prompts(prompts, self.tokenizer.pad_token_id)
    c_ids, c_mask, _ = pad_completions(completions, self.tokenizer.pad_token_id)
    return Rollout(
        prompt_ids=p_ids.repeat_interleave(num_generations, 0),
        prompt_mask=p_mask.repeat_interleave(num_generations, 0),
        completion_ids=c_ids,
        completion_mask=c_mask,
        truncated=torch.tensor([c[-1] != self.tokenizer.eos_token_id for c in completions]),
    )


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _run(rank: int, world: int, preset: str, strategy: str, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import advantage.rl.step as T
    from advantage.engine.parallel import unwrap
    from advantage.engine.rollout import TransformersBackend
    from advantage.rl.config import load_config

    TransformersBackend.generate = _fixed_generate
    captured = {}
    original = T.compute_advantages

    def capture(inputs, *args, **kwargs):
        result = original(inputs, *args, **kwargs)
        captured["advantages"] = result.advantages.clone()
        return result

    T.compute_advantages = capture

    def length_reward(prompts, completions, completion_ids, **kwargs):  # content only
        return [
            len(c) / 4.0 + (sum(ids) % 3) * 0.1
            for c, ids in zip(completions, completion_ids, strict=True)
        ]

    cfg = load_config(
        None,
        [
            f"algorithm={preset}",
            "model.name_or_path=builtin:tiny-random",
            "data.train=builtin:reverse",
            f"log.run_dir={out}/run{world}",
            "log.progress=false",
            "log.tensorboard=false",
            f"rollout.prompts_per_step={P}",
            f"rollout.num_generations={G}",
            "rollout.max_new_tokens=6",
            "train.steps=1",
            "train.lr=1e-4",
            "train.critic_lr=1e-4",
            "eval.size=0",
            "checkpoint.save_final=false",
            "checkpoint.every=0",
            "checkpoint.resume=none",
            f"distributed.strategy={strategy}",
            "train.max_grad_norm=null",
            # Adam's first step is lr·g/(|g| + ε): with ε = 1e-8 it is ±lr for any g ≠ 0, so a 1e-7
            # rounding difference in a near-zero gradient would flip a weight by 2·lr. A larger ε
            # makes the update continuous in the gradient, so equal gradients give equal weights.
            "train.adam_eps=1e-3",
        ],
    )
    from advantage.rl.trainer import Trainer

    trainer = Trainer(cfg, reward_funcs=[length_reward])
    metrics = trainer.train_step()
    policy = trainer.policy
    grads = {n: _full(p.grad).detach().clone() for n, p in unwrap(policy).named_parameters()}
    weights = {n: _full(p).detach().clone() for n, p in unwrap(policy).named_parameters()}
    torch.save(
        {
            "advantages": captured["advantages"],
            "loss": metrics["loss"],
            "metrics": {k: metrics[k] for k in GLOBAL_METRICS if k in metrics},
            "grads": grads,
            "weights": weights,
        },
        f"{out}/world{world}-rank{rank}.pt",
    )
    if world > 1:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("preset", ["grpo", "reinforce_pp", "ppo"])
def test_two_processes_equal_one(preset, strategy, tmp_path):
    out = str(tmp_path)
    mp.spawn(_run, args=(1, preset, strategy, _free_port(), out), nprocs=1, join=True)
    mp.spawn(_run, args=(2, preset, strategy, _free_port(), out), nprocs=2, join=True)
    one = torch.load(tmp_path / "world1-rank0.pt")
    two = [torch.load(tmp_path / f"world2-rank{r}.pt") for r in range(2)]
    # advantages: each rank holds its half of the batch (widths may differ: compare per row)
    adv_two = [row for part in two for row in part["advantages"]]
    assert len(adv_two) == one["advantages"].shape[0] == P * G
    for i, (a, b) in enumerate(zip(adv_two, one["advantages"], strict=True)):
        n = min(a.shape[0], b.shape[0])
        torch.testing.assert_close(a[:n], b[:n], rtol=0, atol=1e-5, msg=f"advantages of row {i}")
        assert a[n:].abs().sum() == 0 and b[n:].abs().sum() == 0
    assert abs(two[0]["loss"] - one["loss"]) <= 1e-5 and two[0]["loss"] == two[1]["loss"]
    assert set(one["metrics"]) >= {"reward/std", "loss/policy", "entropy"}
    for key, value in one["metrics"].items():  # reward/std was the mean of each rank's std
        assert abs(two[0]["metrics"][key] - value) <= 1e-5 * max(1.0, abs(value)), key
    worst_grad = worst_weight = 0.0
    for name, g in one["grads"].items():
        for part in two:  # DDP and FSDP2 leave every rank with the averaged gradient
            worst_grad = max(worst_grad, (part["grads"][name] - g).abs().max().item())
            worst_weight = max(
                worst_weight, (part["weights"][name] - one["weights"][name]).abs().max().item()
            )
    print(
        f"{preset}/{strategy}: loss {one['loss']:.6f} vs {two[0]['loss']:.6f}; "
        f"max |Δgrad| {worst_grad:.2e}; max |Δweight| {worst_weight:.2e}"
    )
    assert worst_grad <= 1e-5 and worst_weight <= 1e-5
    assert max(g.abs().max().item() for g in one["grads"].values()) > 1e-3  # a real gradient


class RankTurns:
    """A gym environment whose episodes end after one turn on rank 0 and three on rank 1."""

    def reset(self, row):
        self.turns = 0

    def step(self, message):
        self.turns += 1
        return "ok", None, os.environ["RANK"] == "0" or self.turns >= 3


def _episodes(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from advantage.rl.config import load_config
    from advantage.rl.trainer import Trainer

    cfg = load_config(
        None,
        [
            "model.name_or_path=builtin:tiny-random", "data.train=builtin:reverse",
            f"log.run_dir={out}/run", "log.progress=false", "log.tensorboard=false",
            "rollout.prompts_per_step=2", "rollout.num_generations=2", "rollout.max_new_tokens=8",
            "rollout.max_turns=3", "train.steps=2", "eval.size=0", "checkpoint.save_final=false",
            # every letter or digit ends a turn (untruncated: the episode goes on)
            f"rollout.stop=[{','.join(repr(c) for c in string.ascii_letters + string.digits)}]",
            "checkpoint.every=0", "distributed.strategy=fsdp2",
        ],
    )  # fmt: skip
    reward = lambda prompts, completions, **kw: [float(len(c)) for c in completions]  # noqa: E731
    result = Trainer(cfg, reward_funcs=[reward], environment_factory=RankTurns).fit()
    torch.save([m["episode/turns"] for m in result.metrics], f"{out}/turns-rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_fsdp2_episodes_of_different_lengths_per_rank_do_not_hang(tmp_path):
    """Every forward of a sharded policy is a collective: a rank whose episodes had all ended
    went on to the update while another started a turn's prefill, and both waited forever (a
    probe, also on the calculator demo). Now it decodes a stand-in row while any rank has a
    turn to take."""
    context = mp.start_processes(
        _episodes, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("FSDP2 episodes hung")
    turns = [torch.load(tmp_path / f"turns-rank{r}.pt") for r in range(2)]
    assert turns == [[2.0, 2.0]] * 2  # the mean over ranks of 1 and 3 turns
