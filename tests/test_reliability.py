"""Bad input gets a clear error that names what to fix, and loses nothing already saved.

Each case here is a row of the README's reliability table.
"""

import json
import math

import pytest
import torch

from advantage.engine.configlib import ConfigError
from advantage.engine.rewards import RewardError
from advantage.engine.rollout import TransformersBackend
from advantage.rl.config import load_config
from advantage.rl.trainer import NonFiniteError, Trainer
from helpers import length_reward, small_config

pytestmark = pytest.mark.slow


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trainer(run_dir, *overrides, reward_funcs=(length_reward,)):
    return Trainer(
        load_config(None, small_config(run_dir, *overrides)), reward_funcs=list(reward_funcs)
    )


def test_missing_prompt_field(tmp_path, run_dir):
    data = _jsonl(tmp_path / "d.jsonl", [{"question": "ab>"}])
    with pytest.raises(
        ConfigError,
        match=r"data.train: row 0 has no prompt field 'prompt' \(columns: question\); set data.prompt_field",
    ):
        _trainer(run_dir, f"data.train={data}")


def test_empty_prompt_names_the_row(tmp_path, run_dir):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "ab>"}, {"prompt": "cd>"}, {"prompt": ""}])
    with pytest.raises(ConfigError, match=r"data.train: row 2 has an empty prompt"):
        _trainer(run_dir, f"data.train={data}")
    # a row without the column other rows have (it was "an empty prompt" after a warning)
    data = _jsonl(tmp_path / "e.jsonl", [{"prompt": "ab>"}, {"question": "cd>"}])
    with pytest.raises(ConfigError, match=r"row 1 has no prompt \('prompt' missing or null\)"):
        _trainer(run_dir, f"data.train={data}")


def test_eval_budget_over_the_context_names_eval_max_new_tokens(run_dir):
    with pytest.raises(ConfigError, match=r"^eval.max_new_tokens=600 leaves no room for a prompt"):
        _trainer(run_dir, "eval.max_new_tokens=600", "data.eval=builtin:reverse", "eval.size=4")


def test_reward_function_needs_a_missing_column(tmp_path, run_dir):
    def needs_answer(prompts, completions, answer, **kwargs):
        return [0.0] * len(completions)

    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "ab>", "solution": "ba"}])
    with pytest.raises(
        ConfigError,
        match=r"reward function 'needs_answer' needs the dataset column\(s\) \['answer'\].*columns: solution",
    ):
        _trainer(run_dir, f"data.train={data}", reward_funcs=[needs_answer])


def test_reward_function_that_raises_mid_run_keeps_saved_checkpoints(run_dir):
    state = {"calls": 0, "bad": None}

    def flaky(prompts, completions, answer, **kwargs):
        state["calls"] += 1
        if state["calls"] == 3:  # step 3: the 2nd prompt's answer (samples 4..7) breaks it
            state["bad"] = answer[5]
        return [
            1.0 / (a != state["bad"]) + len(c) for c, a in zip(completions, answer, strict=True)
        ]

    trainer = _trainer(run_dir, "checkpoint.every=1", "train.steps=4", reward_funcs=[flaky])
    with pytest.raises(
        RewardError,
        match=r"reward function 'flaky' raised ZeroDivisionError on sample 4 \(prompt '\w+>'\)",
    ):
        trainer.fit()
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert saved == ["step-000001", "step-000002"]
    # a new run in the same folder refuses to overwrite them unless asked to resume
    with pytest.raises(ConfigError, match=r"already holds checkpoints.*checkpoint.resume=auto"):
        _trainer(run_dir, "checkpoint.resume=none")
    resumed = _trainer(run_dir, "checkpoint.every=1", "train.steps=4")
    assert resumed.step == 2


def test_empty_completions_and_equal_rewards_train_on_nothing_without_error(run_dir, monkeypatch):
    original = TransformersBackend.generate

    def only_eos(self, prompts, n, params):
        out = original(self, prompts, n, params)
        out.completion_ids[:] = self.tokenizer.pad_token_id
        out.completion_ids[:, 0] = self.tokenizer.eos_token_id
        out.completion_mask[:] = False
        out.completion_mask[:, 0] = True
        out.truncated[:] = False
        return out

    monkeypatch.setattr(TransformersBackend, "generate", only_eos)
    seen = []

    def records(prompts, completions, completion_ids, **kwargs):
        seen.extend(completions)
        return [0.5] * len(completions)  # all equal

    result = _trainer(run_dir, "train.steps=2", reward_funcs=[records]).fit()
    assert set(seen) == {""}
    for m in result.metrics:
        assert m["frac_zero_std_groups"] == 1.0
        assert m["advantages/mean"] == 0.0 and m["advantages/std"] == 0.0
        assert m["completion/length"] == 1.0 and math.isfinite(m["loss/policy"])


def test_model_path_that_does_not_exist(run_dir):
    with pytest.raises(
        ConfigError, match=r"model.name_or_path: the folder './no/such/model' does not exist"
    ):
        Trainer(load_config(None, small_config(run_dir, model="./no/such/model")), [length_reward])


def test_tokenizer_without_pad_token_uses_eos(tmp_path, run_dir, caplog):
    from advantage.tasks import builtin_model_path
    from advantage.tasks.tiny import char_tokenizer

    src = builtin_model_path("tiny-random")
    folder = tmp_path / "nopad"
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(folder)
    tok = char_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(folder)
    with caplog.at_level("WARNING", logger="advantage"):
        trainer = Trainer(
            load_config(None, small_config(run_dir, "train.steps=1", model=str(folder))),
            [length_reward],
        )
    assert trainer.tokenizer.pad_token == "<eos>"
    assert "no pad token: using the EOS token" in caplog.text
    trainer.fit()


def test_nonfinite_loss_skips_updates_then_stops(run_dir):
    def huge(prompts, completions, **kwargs):  # finite rewards whose loss overflows float32
        return [3e38 * (1 if i % 2 else -1) for i in range(len(completions))]

    trainer = _trainer(
        run_dir,
        "algorithm=dr_grpo",
        "train.steps=5",
        "train.max_nonfinite_steps=2",
        reward_funcs=[huge],
    )
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    with pytest.raises(
        NonFiniteError, match="2 consecutive updates had a non-finite loss or gradient"
    ):
        trainer.fit()
    assert all(torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())


def test_safe_defaults():
    cfg = load_config(None, [])
    assert cfg.model.trust_remote_code is False
    assert cfg.reward.timeout is None  # optional; see test_rewards.test_timeout


@pytest.mark.parametrize("column", ["completions", "prompts", "completion_ids"])
def test_column_named_like_a_reward_argument_is_refused(tmp_path, run_dir, column):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "ab>", column: "ba"}])
    with pytest.raises(
        ConfigError,
        match=rf"data.train: column\(s\) \['{column}'\] have the names of arguments every reward "
        r"function receives \(prompts, completions, completion_ids\).*rename the column",
    ):
        _trainer(run_dir, f"data.train={data}")


@pytest.mark.parametrize("key", ["completions", "answer"])
def test_reward_kwargs_that_collide_are_refused(tmp_path, run_dir, key):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "ab>", "answer": "ba"}])
    with pytest.raises(
        ConfigError, match=rf"reward.kwargs: key\(s\) \['{key}'\] collide with the reward call"
    ):
        _trainer(run_dir, f"data.train={data}", f"reward.kwargs={{{key}: x}}")


def test_reward_model_without_a_trained_head_is_refused(run_dir):
    from advantage.tasks import builtin_model_path

    causal_lm = builtin_model_path("tiny-random")  # no score head in its checkpoint
    with pytest.raises(
        ConfigError,
        match=rf"reward.model: the folder '{causal_lm}' has no trained one-label score head "
        r"\(missing from the checkpoint: score.weight; a plain causal LM\?\); train a reward model",
    ):
        _trainer(run_dir, f"reward.model={causal_lm}", "reward.functions=[]", reward_funcs=())


def test_prompt_longer_than_the_model_allows_names_the_row(tmp_path, run_dir):
    # the tiny models have max_position_embeddings=512; 600 characters are 601 tokens (+ <bos>)
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "ab>"}, {"prompt": "a" * 600 + ">"}])
    with pytest.raises(
        ConfigError,
        match=r"data.train: row 1: the prompt has 602 tokens; the model's "
        r"max_position_embeddings=512 minus rollout.max_new_tokens=6 leaves 506; "
        r"set data.max_prompt_tokens=506 \(cuts prompts from the left\) or shorten it",
    ):
        _trainer(run_dir, f"data.train={data}")
    with pytest.raises(
        ConfigError, match=r"data.max_prompt_tokens=600 does not fit: .* leaves 506"
    ):
        _trainer(run_dir, f"data.train={data}", "data.max_prompt_tokens=600")
    _trainer(run_dir, f"data.train={data}", "data.max_prompt_tokens=506")  # cut: trains


def test_ragged_column_warns_and_reaches_rewards_as_none(tmp_path, run_dir, caplog):
    rows = [{"prompt": "ab>", "answer": "ba"}, {"prompt": "cd>"}, {"prompt": "ef>"}]
    data = _jsonl(tmp_path / "d.jsonl", [*rows, {"prompt": "gh>"}])
    seen = []

    def reads_answer(prompts, completions, answer, **kwargs):
        seen.extend(answer)
        return [None if a is None else 1.0 for a in answer]

    with caplog.at_level("WARNING", logger="advantage"):
        trainer = _trainer(
            run_dir, f"data.train={data}", "train.steps=2", reward_funcs=[reads_answer]
        )
    assert "data.train: column 'answer' is missing from 3 of 4 rows (first: row 1)" in caplog.text
    trainer.fit()
    assert set(seen) == {"ba", None}


def half_unscored(prompts, completions, **kwargs):
    """1.0 for prompts of odd length; None (not scored) for the others."""
    return [None if len(p) % 2 == 0 else 1.0 for p in prompts]


def test_unscored_samples_are_out_of_eval_and_logged_as_null(run_dir):
    # an adversarial probe: eval counted a sample no reward scored as 0 (accuracy 0.5 while
    # training said 1.0) and samples.jsonl logged it with reward 0.0
    trainer = _trainer(run_dir, "train.steps=1", "eval.size=16", "data.eval=builtin:reverse",
                       reward_funcs=[half_unscored])  # fmt: skip
    result = trainer.fit()
    evals = [result.eval_before, result.eval_after]
    assert all(e["eval/accuracy"] == 1.0 and e["eval/reward"] == 1.0 for e in evals), evals
    assert all(0 < e["eval/unscored_frac"] < 1 for e in evals), evals
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["reward"] == half_unscored([s["prompt"]], [""])[0] for s in samples)


def test_settings_the_algorithm_never_reads_are_warned_about(run_dir, caplog):
    # a probe: these were accepted without a word
    with caplog.at_level("WARNING", logger="advantage"):
        _trainer(run_dir, "algorithm=grpo", "model.critic=some/critic", "algo.kl_coef=0.5",
                 "algo.kl_placement=none", "algo.kl_controller=adaptive", "algo.kl_target=6",
                 "data.system_prompt=Be brief.", "eval.size=100000",
                 "data.eval=builtin:reverse")  # fmt: skip
    for line in (
        "model.critic='some/critic': grpo trains no critic; the setting does nothing",
        "algo.kl_coef=0.5: algo.kl_placement=none adds no KL term; the setting does nothing",
        "algo.kl_controller=adaptive: grpo has no KL term; the setting does nothing",
        "data.system_prompt is prepended to conversational prompts (lists of messages); "
        "data.train's prompts are plain text, so it is not used",
        "eval.size=100000: the held-out set has",
    ):
        assert line in caplog.text, line
