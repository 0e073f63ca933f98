"""Micro-batches by token budget (`train.max_tokens_per_micro_batch`): how a minibatch is cut, and
that the cut does not change the gradient (the aggregation's denominators are the minibatch's)."""

import pytest
import torch

import advantage.rl.update as update_module
from advantage.engine.packing import micro_batches
from advantage.engine.rollout import Rollout, pad_completions, pad_prompts
from advantage.rl.config import load_config
from advantage.rl.trainer import Trainer
from helpers import length_reward, small_config


def rollout(prompts: list[list[int]], G: int, lengths: list[int]) -> Rollout:
    ids, mask = pad_prompts(prompts, pad_id=0)
    c_ids, c_mask, _ = pad_completions([[5] * n for n in lengths], pad_id=0)
    return Rollout(
        prompt_ids=ids.repeat_interleave(G, 0),
        prompt_mask=mask.repeat_interleave(G, 0),
        completion_ids=c_ids,
        completion_mask=c_mask,
        truncated=torch.zeros(len(lengths), dtype=torch.bool),
    )


def _cut(batch, max_rows, max_tokens, rows=None):
    rows = torch.arange(batch.prompt_ids.shape[0]) if rows is None else rows
    return [p.tolist() for p in micro_batches(batch, rows, max_rows, max_tokens)]


def test_whole_groups_while_they_fit():
    # packed sizes: group 0 = 4 + (2 + 3) = 9, group 1 = 2 + (1 + 0) = 3, group 2 = 3 + (4 + 4) = 11
    batch = rollout([[1] * 4, [2] * 2, [3] * 3], 2, [3, 4, 2, 1, 5, 5])
    assert _cut(batch, None, 12) == [[0, 1, 2, 3], [4, 5]]  # 9 + 3 | 11
    assert _cut(batch, None, 11) == [[0, 1], [2, 3], [4, 5]]  # 9 | 3 (3 + 11 > 11) | 11
    assert _cut(batch, 3, 100) == [[0, 1], [2, 3], [4, 5]]  # at most 3 sequences as well
    assert _cut(batch, 3, None) == [[0, 1, 2], [3, 4, 5]]  # sequences only: plain slices
    # groups in the order given (a shuffled minibatch)
    assert _cut(batch, None, 12, torch.tensor([4, 5, 2, 3, 0, 1])) == [[4, 5], [2, 3, 0, 1]]


def test_a_group_over_the_budget_is_split_with_its_prompt_in_each_part():
    # one group, prompt 4, inputs 5, 5, 5, 5: 24 positions packed
    batch = rollout([[1] * 4], 4, [6, 6, 6, 6])
    assert _cut(batch, None, 14) == [[0, 1], [2, 3]]  # 4 + 5 + 5 each
    assert _cut(batch, None, 9) == [[0], [1], [2], [3]]
    assert _cut(batch, None, 3) == [[0], [1], [2], [3]]  # a sequence over the budget: alone


@pytest.mark.parametrize(
    "cut",
    [
        ["train.max_tokens_per_micro_batch=12"],
        ["train.max_tokens_per_micro_batch=40"],
        ["train.micro_batch_size=3", "train.max_tokens_per_micro_batch=20"],
    ],
)
def test_token_budget_gives_the_same_gradient_as_one_micro_batch(tmp_path, monkeypatch, cut):
    """PPO (critic values, reference and old-policy passes are cut the same way): the policy's
    and the critic's gradients of one update equal those of the uncut minibatch."""
    grads, counts = [], []
    original_step = update_module.optimizer_step
    original_rows = update_module.micro_batch_rows

    def record(run, *args):
        grads.append(
            {
                f"{name}.{n}": p.grad.clone()
                for name, model in (("policy", run.policy), ("critic", run.critic))
                for n, p in model.named_parameters()
                if p.grad is not None
            }
        )
        return original_step(run, *args)

    def count(*args):
        pieces = original_rows(*args)
        counts.append(len(pieces))
        return pieces

    monkeypatch.setattr(update_module, "optimizer_step", record)
    monkeypatch.setattr(update_module, "micro_batch_rows", count)
    for i, extra in enumerate([[], cut]):
        overrides = small_config(tmp_path / str(i), "algorithm=ppo", "train.steps=1", *extra)
        Trainer(load_config(None, overrides), reward_funcs=[length_reward]).fit()
    whole, pieces = grads
    assert counts[0] == 1 and counts[1] > 1
    assert whole.keys() == pieces.keys() and any(k.startswith("critic.") for k in whole)
    for name, g in whole.items():
        scale = max(1.0, g.abs().max().item())
        assert (pieces[name] - g).abs().max().item() <= 1e-6 * scale, name
    assert max(g.abs().max().item() for g in whole.values()) > 1e-4
