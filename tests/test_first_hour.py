"""A new user's first hour: what a user doing a task of their own meets first (issue 13, rows
14–18). Each case is a row of the README's bad-input table."""

import pytest

from advantage.cli import main
from advantage.engine.config_files import load_config as load_stage_config
from advantage.engine.configlib import ConfigError
from advantage.rl.config import load_config
from advantage.rl.trainer import Trainer
from helpers import length_reward, small_config

pytestmark = pytest.mark.slow

NO_DATA = "data.train is required: a .jsonl file, a datasets folder, or builtin:reverse"


def _without_data(run_dir, *overrides):
    return [o for o in small_config(run_dir, *overrides) if not o.startswith("data.train=")]


def test_train_without_data_is_refused(tmp_path, run_dir, capsys):
    with pytest.raises(ConfigError, match=NO_DATA):
        Trainer(load_config(None, _without_data(run_dir, "train.steps=1")), [length_reward])
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["train", str(empty), f"log.run_dir={run_dir}", "train.steps=1"]) == 2
    assert capsys.readouterr().err == f"error: {NO_DATA}\n"
    assert not run_dir.exists()


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sft_and_rm_without_data_are_refused(stage, run_dir):
    from advantage.stages.rm import RMConfig, run_rm
    from advantage.stages.sft import SFTConfig, run_sft

    cls, run = {"sft": (SFTConfig, run_sft), "rm": (RMConfig, run_rm)}[stage]
    cfg = load_stage_config(
        cls,
        None,
        [
            "model.name_or_path=builtin:tiny-random",
            f"log.run_dir={run_dir}",
            "log.progress=false",
            "log.tensorboard=false",
            "train.steps=1",
            "train.batch_size=2",
        ],
    )
    with pytest.raises(ConfigError, match=NO_DATA):
        run(cfg)


def test_tiny_model_tokenizer_loads_as_saved(tmp_path):
    # transformers 5's AutoTokenizer rebuilds a qwen2 folder's character-level tokenizer as
    # Qwen2's byte-level BPE, which dropped spaces, newlines and unknown characters silently
    # (an independent user's probe: "3a1 b>" → "31>"); advantage loads tokenizer.json as saved
    import advantage
    from advantage.engine.models import load_tokenizer

    out = advantage.make_tiny_model(tmp_path / "m", size="micro", chars="ab 1\n>")
    tokenizer = load_tokenizer(str(out))
    ids = tokenizer("a b\n1>")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a b\n1>" and len(ids) == 7
    unknown = tokenizer("azb")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(unknown) == ["<bos>", "a", "<unk>", "b"]
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>"
    # a folder whose tokenizer.json is what AutoTokenizer builds keeps AutoTokenizer's class
    qwen_style = tmp_path / "q"
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(out).save_pretrained(qwen_style)
    (qwen_style / "config.json").write_text((out / "config.json").read_text())
    assert type(load_tokenizer(str(qwen_style))).__name__ == "Qwen2Tokenizer"


def test_make_tiny_model_for_a_toy_task(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import advantage

    out = advantage.make_tiny_model(tmp_path / "m", size="micro", chars="abc=ABC")
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("cab=")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "cab="
    assert len(ids) == 5 and len(tokenizer) == 4 + 7  # <bos> + 4; specials + 7 characters
    assert model.config.vocab_size == len(tokenizer)
    # the command line does the same, and the folder trains
    assert main(["init-model", str(tmp_path / "cli"), "--size", "micro", "--chars", "ab>"]) == 0
    assert "wrote a freshly initialised micro Qwen2" in capsys.readouterr().out
    assert main(["init-model", str(tmp_path / "cli")]) == 2  # never over an existing folder
    assert "exists and is not an empty folder" in capsys.readouterr().err
    trainer = Trainer(
        load_config(None, small_config(tmp_path / "run", model=str(tmp_path / "cli"))),
        [length_reward],
    )
    assert len(trainer.fit().metrics) == 3


def test_builtin_random_models_are_documented():
    from advantage.docs import config_reference

    reference = config_reference()
    assert "builtin:tiny-random" in reference and "builtin:small-random" in reference


@pytest.mark.parametrize(
    ("command", "keys"),
    [
        ("sft", ["data.train = null", "train.lr = 2e-05", "train.max_length", "log.every = 25"]),
        ("rm", ["data.chosen_field = 'chosen'", "train.lr = 1e-05", "pairs = 4096"]),
        ("train", ["rollout.num_generations = 8", "algo.clip_high = null", "reward.on_timeout"]),
    ],
)
def test_help_of_every_command_lists_its_config_keys(command, keys, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(f"  {key}" in out for key in keys), out
    assert "A model trained from scratch" in out  # which learning rate when


def test_config_reference_covers_sft_and_rm():
    from advantage.docs import config_reference

    reference = config_reference()
    for heading in ("## `advantage train`", "## `advantage sft`", "## `advantage rm`"):
        assert heading in reference
    assert "| `train.max_length` |" in reference and "| `data.rejected_field` |" in reference
    assert "1e-4 to 3e-4 for RL" in reference


def test_sft_without_progress_bar_prints_every_log_every_steps(tmp_path, run_dir, capsys):
    import advantage

    rows = [{"prompt": f"{w}>", "completion": w[::-1]} for w in ("ab", "cab", "bca", "dab")]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    common = [
        "model.name_or_path=builtin:tiny-random",
        f"data.train={data}",
        "log.progress=false",
        "log.tensorboard=false",
        "train.steps=30",
        "train.batch_size=2",
        "train.lr=1e-3",
    ]
    advantage.sft(None, [*common, f"log.run_dir={run_dir}"])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert [line.split()[1] for line in printed] == ["25", "30"]  # log.every=25 and the last
    advantage.sft(None, [*common, f"log.run_dir={run_dir}-10", "log.every=10"])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(printed) == 3


def test_no_held_out_set_is_warned_about_once(tmp_path, run_dir, caplog):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "ab>"}\n{"prompt": "cd>"}\n')
    with caplog.at_level("WARNING", logger="advantage"):
        trainer = Trainer(
            load_config(None, small_config(run_dir, f"data.train={data}", "eval.size=10")),
            [length_reward],
        )
    assert caplog.text.count("data.eval is not set: no held-out set is evaluated") == 1
    assert "result.eval_before and result.eval_after stay empty" in caplog.text
    assert trainer.fit().eval_after == {}


def test_eval_funcs_take_callables(run_dir):
    import advantage

    judged = []

    def judge(prompts, completions, answer, **kwargs):
        judged.extend(completions)
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    result = advantage.train(
        None,
        reward_funcs=[length_reward],
        eval_funcs=[judge],
        overrides=small_config(run_dir, "train.steps=1", "eval.size=4", "data.eval=null"),
    )
    assert set(result.eval_after) >= {"eval/accuracy", "eval/reward"}
    assert len(judged) == 2 * 4  # before and after, 4 held-out prompts each


def test_eval_command_without_an_answer_column_fails_before_loading(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "ab>", "solution": "ba"}\n')
    assert main(["eval", "./no/such/model", str(data)]) == 2  # the model is never looked at
    err = capsys.readouterr().err
    assert err == (
        "error: DATASET: reward function 'exact_match' needs the dataset column(s) ['answer'], "
        f"which DATASET ({data}) does not have (columns: solution, and the prompt column "
        "'prompt'); the default judge is exact_match: give --reward FN\n"
    )


def test_rerun_of_a_finished_run_says_so_on_one_line(run_dir, capsys):
    Trainer(load_config(None, small_config(run_dir, "train.steps=2")), [length_reward]).fit()
    capsys.readouterr()
    rerun = Trainer(load_config(None, small_config(run_dir, "train.steps=2")), [length_reward])
    result = rerun.fit()
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"run_dir {run_dir} already finished at step 2; nothing to do (set checkpoint.resume=none "
        "and a new log.run_dir to train again)"
    )
    assert result.metrics == [] and rerun.step == 2


def test_a_rerun_or_resumed_run_reports_its_logged_evaluations(run_dir):
    """`eval_before` / `eval_after` of a rerun are the run's own, read back from its metrics
    (a chain or a script reading them after a rerun gets numbers, not a KeyError)."""
    evals = ["data.eval=builtin:reverse", "eval.size=8"]
    first = Trainer(
        load_config(None, small_config(run_dir, "train.steps=2", *evals)), [length_reward]
    ).fit()
    assert "eval/accuracy" in first.eval_before and "eval/accuracy" in first.eval_after
    rerun = Trainer(
        load_config(None, small_config(run_dir, "train.steps=2", *evals)), [length_reward]
    ).fit()
    # the same keys and values (an independent probe found `step` and `time` added on reruns)
    assert (rerun.eval_before, rerun.eval_after) == (first.eval_before, first.eval_after)
    resumed = Trainer(
        load_config(None, small_config(run_dir, "train.steps=3", *evals)), [length_reward]
    ).fit()
    assert resumed.eval_before == first.eval_before
    assert resumed.eval_after.keys() == first.eval_after.keys()
