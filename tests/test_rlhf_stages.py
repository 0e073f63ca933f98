"""SFT → reward model → PPO: the Bradley–Terry loss, prompt masking in SFT, running reward
statistics, and a reward model saved by `rm` loading in `train`."""

import math

import pytest
import torch

from advantage.core import RunningMoments, bradley_terry_loss
from advantage.engine.supervised import collate
from advantage.engine.supervised_rows import encode_pair
from helpers import small_config


def test_bradley_terry_loss_and_gradient_hand_computed():
    chosen = torch.tensor([2.0, 0.5], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0], requires_grad=True)
    # Δ = [1, -0.5]; L = mean(-log σ(Δ)) = (log(1 + e^-1) + log(1 + e^0.5)) / 2
    loss = bradley_terry_loss(chosen, rejected)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # dL/dr_c = -σ(-Δ)/N = -(1 - σ(Δ))/2;  dL/dr_r = +σ(-Δ)/2
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    torch.testing.assert_close(
        chosen.grad, torch.tensor([-(1 - sig(1.0)) / 2, -(1 - sig(-0.5)) / 2])
    )
    torch.testing.assert_close(rejected.grad, -chosen.grad)
    # a margin m shifts Δ: with m = 1 the first pair is at Δ - m = 0 → log 2
    with_margin = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0]))
    assert with_margin.item() == pytest.approx(math.log(2.0), abs=1e-6)
    # no overflow for a huge gap
    assert bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4])).item() == pytest.approx(
        2e4
    )


def test_sft_loss_only_on_completion_tokens():
    from transformers import AutoModelForCausalLM

    from advantage.tasks import builtin_model_path
    from advantage.tasks.tiny import char_tokenizer

    tok = char_tokenizer()
    p, c = encode_pair(tok, "abc>", "cba")
    assert p == tok("abc>")["input_ids"] and c[-1] == tok.eos_token_id and len(c) == 4
    batch = collate([(p, c), (p[:3], c[:2])], tok.pad_token_id)
    assert (batch["labels"][0, : len(p)] == -100).all() and (
        batch["labels"][0, len(p) :] == torch.tensor(c)
    ).all()
    assert (batch["labels"][1, 5:] == -100).all()  # padding
    model = AutoModelForCausalLM.from_pretrained(builtin_model_path("tiny-random"))
    with torch.no_grad():
        loss = model(**batch).loss
        # the same loss by hand: mean NLL over the 6 completion tokens only
        logp = torch.log_softmax(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1
        )
        targets = batch["labels"][:, 1:]
        picked = logp[:, :-1].gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        manual = -(picked * (targets != -100)).sum() / (targets != -100).sum()
    torch.testing.assert_close(loss, manual)
    assert int((targets != -100).sum()) == 6


def test_running_moments_hand_computed_and_state():
    rm = RunningMoments()
    out = rm.normalize(torch.tensor([1.0, 3.0]))
    # after {1, 3}: mean 2, std (n-1) = sqrt(2)
    torch.testing.assert_close(out, torch.tensor([-1 / 2**0.5, 1 / 2**0.5]))
    rm.update(torch.tensor([5.0, 7.0]))  # {1,3,5,7}: mean 4, Σdev² = 20, std = sqrt(20/3)
    assert rm.mean == pytest.approx(4.0) and rm.std == pytest.approx((20 / 3) ** 0.5)
    other = RunningMoments()
    other.load_state_dict(rm.state_dict())
    assert other.mean == rm.mean and other.std == rm.std


@pytest.mark.slow
def test_reward_model_from_rm_loads_in_train(tmp_path):
    from advantage.engine.config_files import load_config as load_stage_config
    from advantage.engine.configlib import ConfigError
    from advantage.rl.config import load_config
    from advantage.rl.trainer import Trainer
    from advantage.stages.rm import RMConfig, finished_rm, run_rm
    from advantage.tasks import builtin_model_path

    base = builtin_model_path("tiny-random")
    cfg = load_stage_config(
        RMConfig,
        None,
        [
            f"model.name_or_path={base}",
            "data.train=builtin:reverse",
            f"log.run_dir={tmp_path / 'rm'}",
            "log.progress=false",
            "log.tensorboard=false",
            "train.steps=30",
            "train.lr=1e-3",
            "pairs=256",
        ],
    )
    stats = run_rm(cfg)
    assert finished_rm(tmp_path / "rm") == stats  # what a rerun of the chain keeps
    with pytest.raises(ConfigError, match=r"already holds a reward-model run \(final\)"):
        run_rm(cfg)  # it overwrote final/ and appended to metrics.jsonl
    # it learned something in 30 steps: against its own start (≈0.50 with a random head; 0.665
    # after, on one CPU), not a fixed number that another CPU's kernels could land just under
    assert stats["eval_pairwise_accuracy"] > stats["eval_pairwise_accuracy_before"] + 0.05, stats
    trainer = Trainer(
        load_config(
            None,
            small_config(
                tmp_path / "ppo",
                "algorithm=ppo",
                f"reward.model={stats['final']}",
                "reward.functions=[]",
                "reward.model_normalize=true",
                "reward.missing_eos_penalty=1.0",
                "train.steps=2",
            ),
        )
    )
    result = trainer.fit()
    assert all(math.isfinite(m["loss/value"]) for m in result.metrics)
    assert trainer.rewards.sources[0].name.startswith("reward_model(")
    assert trainer.rewards.sources[0].fn.moments.count == 2 * 8  # normalised over both steps


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], r"data.train: the dataset is empty"),
        ([{"prompt": "a", "chosen": "b", "rejected": "c"}], r"1 pair\(s\) leave none to train"),
        ([{"prompt": "a", "chosen": "b", "rejected": "c", "m": "x"}] * 4,
         r"row 0's margin \('m'\) is 'x', not a finite number"),
        ([{"prompt": "a", "chosen": 1, "rejected": "c"}] * 4,
         r"^data.train: row 0: 'chosen' must be a string or a list of messages, not int 1$"),
    ],
)  # fmt: skip
def test_reward_model_data_errors_name_the_field(tmp_path, rows, message):
    """Each was a raw IndexError / ValueError traceback (the last one mid-training)."""
    import json

    from advantage.engine.config_files import load_config as load_stage_config
    from advantage.engine.configlib import ConfigError
    from advantage.stages.rm import RMConfig, run_rm
    from advantage.tasks import builtin_model_path

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_stage_config(
        RMConfig, None,
        [f"model.name_or_path={builtin_model_path('tiny-random')}", f"data.train={data}",
         f"log.run_dir={tmp_path / 'rm'}", "log.progress=false", "log.tensorboard=false",
         "data.margin_field=m" if "margin" in message else "train.steps=2"],
    )  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        run_rm(cfg)


def _sft_config(tmp_path, rows, *overrides):
    import json

    from advantage.engine.config_files import load_config as load_stage_config
    from advantage.stages.sft import SFTConfig
    from advantage.tasks import builtin_model_path

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_stage_config(
        SFTConfig, None,
        [f"model.name_or_path={builtin_model_path('tiny-random')}", f"data.train={data}",
         f"log.run_dir={tmp_path / 'sft'}", "log.progress=false", "log.tensorboard=false",
         "train.steps=2", "train.batch_size=2", *overrides],
    )  # fmt: skip


def test_sft_refuses_when_max_length_cuts_every_completion_away(tmp_path):
    """It trained on no token at all: loss nan, grad_norm 0, "SFT done", exit 0."""
    from advantage.engine.configlib import ConfigError
    from advantage.stages.sft import run_sft

    cfg = _sft_config(tmp_path, [{"prompt": "a" * 50, "completion": "b"}] * 4,
                      "train.max_length=10")  # fmt: skip
    with pytest.raises(ConfigError, match=r"^data.train: row 0's completion is cut away entirely "
                       r"by train.max_length=10 .*nothing would train"):  # fmt: skip
        run_sft(cfg)
    assert not (tmp_path / "sft" / "final").exists()


def test_sft_leaves_out_rows_max_length_cuts_away_with_a_warning(caplog):
    from advantage.engine.supervised_rows import encode_rows
    from advantage.tasks.tiny import char_tokenizer

    tok = char_tokenizer()
    rows = [{"prompt": "ab>", "completion": "ba"}, {"prompt": "a" * 50, "completion": "b"}] * 2
    with caplog.at_level("WARNING", logger="advantage"):
        pairs = encode_rows(tok, rows, 10)
    assert len(pairs) == 2 and all(len(c) > 0 for _, c in pairs)
    assert "2 of 4 rows keep no completion token (first: row 1's completion is cut away " \
        "entirely by train.max_length=10" in caplog.text  # fmt: skip


def test_sft_reads_each_row_of_a_mixed_file_in_its_own_format():
    """A file mixing {messages} and {prompt, completion} rows reads as None where a row lacks a
    column: the valid messages row 0 was refused ("row 0 has an empty completion")."""
    from advantage.engine.supervised_rows import PairColumns, rows_to_pairs

    chat = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "cba"}]
    rows = [
        {"messages": chat, "prompt": None, "completion": None},
        {"messages": None, "prompt": "ab", "completion": "ba"},
    ]
    assert rows_to_pairs(rows, PairColumns()) == [(chat[:1], "cba"), ("ab", "ba")]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": ["abc", "cba"]},
         r"'messages': message 0 must be an object \{\"role\", \"content\"\}, not str 'abc'"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
         r"'messages': message 1 \(assistant\) has no 'content' string"),
        ({"messages": "abc"}, r"'messages' must be a non-empty list of messages, not str 'abc'"),
        ({"prompt": "ab", "completion": 5},
         r"'completion' must be a string, a list of messages or \[text, trainable\] segments, "
         r"not int 5"),
        ({"prompt": 7, "completion": "x"},
         r"'prompt' must be a string or a list of messages, not int 7"),
    ],
)  # fmt: skip
def test_sft_row_errors_name_the_row_and_field(tmp_path, row, message):
    """Each was a traceback (AttributeError, KeyError 'content', TypeError)."""
    from advantage.engine.configlib import ConfigError
    from advantage.stages.sft import run_sft

    good = {"prompt": "ab", "completion": "ba"}
    with pytest.raises(ConfigError, match=r"^data.train: row 1: " + message + "$"):
        run_sft(_sft_config(tmp_path, [good, row]))


def test_sft_completion_may_be_one_assistant_message():
    """It was `KeyError: -1`; the docstring promises "an assistant message"."""
    from advantage.engine.supervised_rows import PairColumns, encode_pair, rows_to_pairs
    from advantage.tasks.tiny import char_tokenizer

    message = {"role": "assistant", "content": "ba"}
    pairs = rows_to_pairs([{"prompt": "ab>", "completion": message}], PairColumns())
    assert pairs == [("ab>", [message])]
    tok = char_tokenizer()
    assert encode_pair(tok, *pairs[0]) == encode_pair(tok, "ab>", "ba")
