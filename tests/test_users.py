"""Users' experience: the report (rendered in headless Chromium), LoRA, datasets and chat
templates, `advantage eval`, built-in reward helpers, and the generated config reference."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advantage.engine.configlib import ConfigError
from advantage.engine.reward_helpers import (
    exact_match,
    format_regex,
    length_penalty,
    overlong_penalty,
)
from advantage.rl.config import load_config
from advantage.rl.trainer import Trainer
from helpers import length_reward, rendered_page, small_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_report_page_renders_with_every_plot(run_dir):
    cfg = load_config(None, small_config(run_dir, "train.steps=4", "log.samples=2"))
    Trainer(cfg, reward_funcs=[length_reward]).fit()  # log.report=true writes the report at the end
    page = run_dir / "report" / "index.html"
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    assert {
        "reward.png",
        "kl.png",
        "entropy.png",
        "length.png",
        "clip.png",
        "advantages.png",
    } <= set(pngs)
    dom, loaded, total = rendered_page(page, run_dir / "chrome")
    assert loaded == total == len(pngs)
    assert "Sample completions" in dom and dom.count("<tr>") > 2


@pytest.mark.slow
def test_lora_reference_is_the_base_and_saving_writes_the_adapter(run_dir):
    from transformers import AutoModelForCausalLM

    from advantage.engine.models import AdapterDisabled, completion_logprobs

    cfg = load_config(
        None,
        small_config(
            run_dir,
            "train.steps=3",
            "checkpoint.save_final=true",
            "model.lora={r: 4, lora_alpha: 8}",
            "train.lr=1e-2",
        ),
    )
    trainer = Trainer(cfg, reward_funcs=[length_reward])
    assert isinstance(trainer.ref, AdapterDisabled)  # no second copy of the weights
    trainable = sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.policy.parameters())
    assert trainable < total // 20
    result = trainer.fit()
    assert result.metrics[-1]["kl"] > 0  # the adapters moved the policy away from the base
    assert (run_dir / "final" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final-merged")
    batch = trainer.rollout_and_score().rollout
    with torch.no_grad():
        lp_peft, _ = completion_logprobs(trainer.policy, batch)
        lp_merged, _ = completion_logprobs(merged, batch)
    torch.testing.assert_close(
        lp_merged[batch.completion_mask], lp_peft[batch.completion_mask], atol=1e-4, rtol=0
    )
    # a LoRA checkpoint consolidates to the merged model (its peft keys failed to load), and
    # `advantage merge` takes the adapter from anywhere (its base path is absolute) or refuses
    # a folder that is no adapter in one line
    from advantage.cli import main
    from advantage.engine.checkpoint import latest_checkpoint

    assert main(["consolidate", str(latest_checkpoint(run_dir)), str(run_dir / "c")]) == 0
    assert main(["merge", str(run_dir / "final"), str(run_dir / "m")]) == 0
    for folder in ("c", "m"):
        other = AutoModelForCausalLM.from_pretrained(run_dir / folder).state_dict()
        for name, weight in merged.state_dict().items():
            torch.testing.assert_close(other[name], weight, atol=1e-6, rtol=0, msg=name)
    assert main(["merge", str(run_dir / "c"), str(run_dir / "x")]) == 2
    assert not (run_dir / "x").exists()


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)


@pytest.mark.slow
def test_conversational_jsonl_and_columns_reach_rewards(tmp_path, run_dir):
    from advantage.tasks import builtin_model_path
    from advantage.tasks.tiny import char_tokenizer

    tok_dir = tmp_path / "tok"
    tok = char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tok_dir)
    rows = [
        {"prompt": [{"role": "user", "content": f"rev {w}"}], "answer": w[::-1], "level": i}
        for i, w in enumerate(["abc", "bca", "cab", "dab"])
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = {}

    def reads(prompts, completions, answer, level, **kwargs):
        seen.update(prompt=prompts[0], completion=completions[0], answer=answer, level=level)
        return [float(len(completion[0]["content"])) for completion in completions]

    cfg = load_config(
        None,
        small_config(
            run_dir,
            f"data.train={data}",
            f"model.tokenizer={tok_dir}",
            "train.steps=1",
            "data.system_prompt=be brief",
            model=str(builtin_model_path("tiny-random")),
        ),
    )
    trainer = Trainer(cfg, reward_funcs=[reads])
    trainer.fit()
    assert seen["prompt"] == rows[0]["prompt"] or seen["prompt"] in [r["prompt"] for r in rows]
    assert isinstance(seen["completion"], list) and seen["completion"][0]["role"] == "assistant"
    assert len(seen["answer"]) == 8 and len(seen["level"]) == 8  # one value per completion
    from advantage.engine.data import encode_prompt

    text = tok.decode(encode_prompt(tok, rows[0]["prompt"], "be brief"))
    assert text == "<s>be brief<u>rev abc<a>"


def test_datasets_folder_loads(tmp_path):
    import datasets

    from advantage.engine.data import load_rows

    datasets.Dataset.from_list([{"prompt": "ab>", "answer": "ba"}]).save_to_disk(tmp_path / "ds")
    assert load_rows(str(tmp_path / "ds")) == [{"prompt": "ab>", "answer": "ba"}]
    (tmp_path / "d.csv").write_text("prompt,answer\nab>,ba\n")
    assert load_rows(str(tmp_path / "d.csv"))[0]["answer"] == "ba"


def test_csv_columns_are_the_text_written(tmp_path):
    # an independent user's probe: `datasets` inferred a column of digit strings as integers
    # (answers "012" → 12, "000" → 0) and parsed "NA" as missing, silently
    from advantage.engine.data import load_rows

    (tmp_path / "d.csv").write_text('prompt,answer,note\n"3, 1>",012,NA\n10>,000,\n')
    assert load_rows(str(tmp_path / "d.csv")) == [
        {"prompt": "3, 1>", "answer": "012", "note": "NA"},
        {"prompt": "10>", "answer": "000", "note": ""},
    ]
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ConfigError, match=r"data\.train: .*empty\.csv has no header row"):
        load_rows(str(tmp_path / "empty.csv"))


@pytest.mark.slow
def test_eval_command_greedy_and_pass_at_k():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "advantage",
            "eval",
            "builtin:tiny-reverse",
            "builtin:reverse:eval",
            "--size",
            "40",
            "--pass-k",
            "4",
            "--max-new-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert 0.2 < result["eval/accuracy"] < 0.9  # the warm start: imperfect, not broken
    assert result["eval/pass@4"] >= result["eval/accuracy"]


def test_reward_helpers_hand_computed():
    assert exact_match(None, [" ba ", "ab", "x"], answer=["ba", "ba", None]) == [1.0, 0.0, None]
    assert format_regex(None, ["<a>1</a>", "1"], format_pattern=r"<a>\d+</a>") == [1.0, 0.0]
    assert length_penalty(
        None, None, [[1] * 3, [1] * 10], target_length=5, length_penalty_coef=0.1
    ) == [0.0, pytest.approx(-0.5)]
    # DAPO overlong: L_max 10, buffer 4 → 0 up to 6, then (6 - n)/4, -1 beyond 10
    assert overlong_penalty(
        None,
        None,
        [[0] * 6, [0] * 8, [0] * 10, [0] * 12],
        max_completion_length=10,
        overlong_buffer=4,
    ) == [0.0, -0.5, -1.0, -1.0]


def test_math_answer_helper():
    from advantage.engine.reward_helpers import math_answer

    got = math_answer(
        None,
        ["The answer is $\\frac{1}{2}$", "so 0.5", "it is 3"],
        answer=["$0.5$", "$\\frac12$", "$4$"],
    )
    assert got == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("name", ["config.md", "algorithms.md"])
def test_generated_docs_are_current(name):
    from advantage.docs import GENERATED

    assert (ROOT / "docs" / name).read_text() == GENERATED[name](), "run: advantage docs"


def test_the_config_reference_names_every_preset():
    from advantage.core.presets import PRESETS

    line = next(
        line for line in (ROOT / "docs" / "config.md").read_text().splitlines()
        if line.startswith("| `algorithm` |")
    )  # fmt: skip
    assert set(PRESETS) - set(re.findall(r"[a-z_]+", line)) == set()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ([], r"no reward: reward_funcs=\[\] and neither reward.model nor an environment's"),
        ([42], r"reward_funcs\[0\] is 42 \(int\), not a callable"),
        ("exact_match", r"reward_funcs: expected a callable or a list of callables"),
    ],
)
def test_reward_funcs_of_the_python_api_fail_before_any_model_loads(tmp_path, given, message):
    # an adversarial probe: [] fell back to the config's functions (now: none but a reward
    # model's or an environment's), [42] failed after a rollout
    cfg = load_config(None, small_config(tmp_path / "run"))
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, reward_funcs=given)
    if given != []:  # [] is known to be wrong only once the run's reward sources are built
        assert not (tmp_path / "run").exists()


def test_one_reward_function_as_trl_takes_it(tmp_path):
    cfg = load_config(None, small_config(tmp_path / "run", "train.steps=1"))
    assert len(Trainer(cfg, reward_funcs=length_reward).fit().metrics) == 1
