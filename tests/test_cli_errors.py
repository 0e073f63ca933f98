"""The command line prints one line (`error: ...`, exit code 2) instead of a traceback for bad
input: files that are not YAML or not UTF-8, a full disk, reward files that do not import, typos
in commands, folders and hub ids. Each case is a row of the README's bad-input table."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advantage.cli import main
from helpers import small_config

ROOT = Path(__file__).resolve().parents[1]


def _error(capsys, *argv) -> str:
    """Run the CLI in this process; the one line it printed to stderr (exit code 2)."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.removeprefix("error: ").rstrip("\n")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: 1.0e-3\n  steps: [1, 2\nlog:\n  every: 1\n")
    err = _error(capsys, "train", str(config))
    assert err.startswith(f"{config}: line 4, column 4: YAML syntax error:"), err
    assert "<unicode string>" not in err
    assert _error(capsys, "train", "train.adam_betas=[0.9,").startswith(
        "override 'train.adam_betas=[0.9,': line 1"
    )


def test_a_key_given_twice_is_refused_not_dropped(tmp_path, capsys):
    # an adversarial probe: PyYAML kept the second `train:` section, dropping the first's lr
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  steps: 2\n  lr: 3.0e-4\nlog:\n  every: 1\ntrain:\n  seed: 7\n")
    assert _error(capsys, "train", str(config)) == (
        f"{config}: line 6, column 1: YAML error: the key 'train' appears twice in one mapping "
        "(first at line 1); merge the two"
    )
    assert _error(capsys, "train", "rollout.vllm={a: 1, a: 2}").startswith(
        "override 'rollout.vllm={a: 1, a: 2}': line 1, column 8: YAML error: the key 'a' appears"
    )


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    # an adversarial probe: rows written by json.dumps(ensure_ascii=False) with U+2028 / U+0085
    # in a string were cut in two by str.splitlines: "line 1 is not valid JSON"
    from advantage.engine.data import load_rows

    rows = [{"prompt": "a\u2028b>", "answer": "x"}, {"prompt": "c\x85d>", "answer": "y"}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows))
    assert "\u2028" in data.read_text() and [r["prompt"] for r in load_rows(str(data))] == [
        "a\u2028b>",
        "c\x85d>",
    ]


def test_non_utf8_config_and_jsonl_name_the_line_and_byte(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"train:\n  lr: 1.0e-3 # caf\xe9\n")
    assert _error(capsys, "train", str(config)) == (
        f"{config}: line 2 (byte 25, b'\\xe9') is not UTF-8 text; save the file as UTF-8"
    )
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "ab>"}\n{"prompt": "\xff>"}\n')
    assert _error(capsys, "train", f"data.train={data}") == (
        f"data.train: {data}: line 2 (byte 30, b'\\xff') is not UTF-8 text; save the file as UTF-8"
    )


def test_numeric_field_out_of_range(capsys):
    err = _error(capsys, "train", "data.train=builtin:reverse", "train.lr=nan")
    assert err == "train.lr must be a finite number > 0, got nan"
    assert _error(capsys, "sft", "train.lr=-1") == "train.lr must be a finite number > 0, got -1.0"
    # adversarial probes: the worker died at set_num_threads; a TypeError from TCPStore
    assert _error(capsys, "train", "distributed.rollout_threads=-3") == (
        "distributed.rollout_threads must be >= 1, got -3"
    )
    assert _error(capsys, "train", "distributed.rollout_address=127.0.0.1:99999") == (
        "distributed.rollout_address: '127.0.0.1:99999' is not HOST:PORT (e.g. 10.0.0.2:29600)"
    )


@pytest.mark.slow
def test_full_disk_is_one_line(run_dir, capsys):
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    err = _error(capsys, "train", *small_config(run_dir, "train.steps=1"))
    assert (
        err
        == f"cannot write {run_dir}: no space left on device; free space or choose another folder"
    )


def test_torch_save_on_a_full_disk_is_one_line(run_dir, capsys, monkeypatch):
    def full_disk(config, **kwargs):  # what torch.save raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr("advantage.rl.trainer.train", full_disk)
    err = _error(capsys, "train", *small_config(run_dir))
    assert err.startswith(f"cannot write {run_dir}: the disk is full or not writable (torch.save:")


@pytest.mark.slow
def test_module_reward_in_the_current_folder_imports_from_the_script(tmp_path):
    """The `advantage` script (a console entry point) sees the current folder, as `python -m`."""
    (tmp_path / "my_rewards.py").write_text(
        "def lengthy(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "advantage"  # what pip writes for [project.scripts]
    script.write_text("import sys\nfrom advantage.cli import main\nsys.exit(main())\n")
    run = small_config(tmp_path / "run", "train.steps=1", "reward.functions=[my_rewards:lengthy]")
    out = subprocess.run(
        [sys.executable, str(script), "train", *run],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"reward/lengthy"' in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_reward_file_with_a_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("def ok():\n    return 1\n\ndef fn(prompts:\n")
    err = _error(capsys, "train", "data.train=builtin:reverse", f"reward.functions=[{bad}:fn]")
    assert err.startswith(f"reward.functions: {bad} line 4: "), err
    raising = tmp_path / "raising.py"
    raising.write_text("import os\nVALUE = 1 / 0\n")
    err = _error(capsys, "train", "data.train=builtin:reverse", f"reward.functions=[{raising}:fn]")
    assert (
        err == f"reward.functions: importing '{raising}' raised ZeroDivisionError: division by zero"
    )


def test_card_with_a_typo(capsys):
    assert _error(capsys, "card", "grpoo").startswith("unknown preset 'grpoo'; valid: ppo, grpo")
    assert _error(capsys, "card", "grpo", "scope=banana").startswith("algo.scope: 'banana'")
    assert _error(capsys, "card", "grpo", "kl_coef=abc") == "kl_coef: expected a number, got 'abc'"
    assert _error(capsys, "card", "grpo", "scopes=batch").startswith(
        "unknown config key 'scopes'; did you mean 'scope'?"
    )


def test_report_on_a_missing_run(tmp_path, capsys):
    missing = tmp_path / "no-run"
    assert _error(capsys, "report", str(missing)) == f"RUN_DIR '{missing}' does not exist"
    assert _error(capsys, "report", str(tmp_path)) == (
        f"RUN_DIR '{tmp_path}' has no metrics.jsonl (not a run folder?)"
    )


def test_consolidate_given_a_run_folder_lists_its_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    for step in ("step-000002", "step-000004"):
        (run / "checkpoints" / step).mkdir(parents=True)
        (run / "checkpoints" / step / "trainer_state.json").write_text("{}")
    err = _error(capsys, "consolidate", str(run), str(tmp_path / "out"))
    assert err == (
        f"CHECKPOINT '{run}' is a run folder, not a checkpoint; give one of its checkpoints: "
        f"{run}/checkpoints/step-000002, {run}/checkpoints/step-000004"
    )
    err = _error(capsys, "consolidate", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert err.startswith(f"CHECKPOINT '{tmp_path / 'nope'}' does not exist")


def test_consolidate_and_merge_never_write_into_a_folder_with_files(tmp_path, capsys):
    # an adversarial probe: both wrote over a run's final/ (and into checkpoints, the adapter)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    final = tmp_path / "run" / "final"
    final.mkdir()
    (final / "model.safetensors").write_text("kept")
    for argv in (["consolidate", str(checkpoint)], ["merge", str(tmp_path / "adapter")]):
        err = _error(capsys, *argv, str(final))
        assert err == f"OUT '{final}' exists and is not an empty folder; choose a new one"
    assert (final / "model.safetensors").read_text() == "kept"


def test_an_interrupted_stage_run_trains_again_with_its_logs_kept(tmp_path, caplog):
    """Ctrl-C in `advantage sft` / `rm` (or a chain's RM stage) left logs and no model, and the
    same command was refused for good ("already holds a run"); now the logs move aside."""
    from advantage.engine.supervised import stage_folder

    run = tmp_path / "rm"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with caplog.at_level("WARNING", logger="advantage"):
        stage_folder(run, "a reward-model")
    (aside,) = run.glob("interrupted-*")
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not (run / "metrics.jsonl").exists() and "training again" in caplog.text


def test_sft_never_writes_over_a_run(tmp_path, capsys):
    run = tmp_path / "sft"
    (run / "final").mkdir(parents=True)
    err = _error(capsys, "sft", f"log.run_dir={run}", "data.train=builtin:reverse")
    assert err == (
        f"log.run_dir '{run}' already holds an SFT run (final); choose a new log.run_dir "
        "(nothing is overwritten)"
    )


def test_eval_with_a_negative_pass_k(capsys):
    err = _error(capsys, "eval", "builtin:tiny-random", "builtin:reverse:eval", "--pass-k", "-1")
    assert err == "--pass-k must be >= 0, got -1"


def test_prompt_given_as_a_list_of_strings(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "ab>"}, {"prompt": ["reverse", "ab>"]}])
    err = _error(capsys, "train", f"data.train={data}")
    assert err == (
        "data.train: row 1: the prompt is a list but not of chat messages {role, content} "
        "(got ['reverse', 'ab>']); give a string or a list of messages"
    )


def test_a_tokenizer_that_does_not_fit_the_model(tmp_path, capsys, caplog):
    # adversarial probes: more tokens than embedding rows was an IndexError traceback from
    # the model's forward; far fewer trained silently on completions that decode to nothing
    assert main(["init-model", str(tmp_path / "m"), "--chars", "fedcba>"]) == 0  # 11 tokens
    capsys.readouterr()
    base = ["train", "data.train=builtin:reverse", f"log.run_dir={tmp_path / 'run'}"]
    assert _error(
        capsys, *base, f"model.name_or_path={tmp_path / 'm'}", "model.tokenizer=builtin:tiny-random"
    ) == (
        "model.tokenizer: the tokenizer has 87 tokens but the model's embedding has 11 rows; "
        "use the model's own tokenizer (ids past its table cannot be embedded)"
    )
    from advantage.engine.models import check_vocabulary, load_causal_lm, load_tokenizer
    from advantage.tasks import builtin_model_path

    with caplog.at_level("WARNING", logger="advantage"):
        check_vocabulary(
            load_tokenizer(str(tmp_path / "m")), load_causal_lm(builtin_model_path("tiny-random"))
        )
    assert "the tokenizer has 11 tokens but the model's embedding has 87 rows" in caplog.text


def test_model_and_data_typos_fail_at_once(tmp_path, capsys, monkeypatch):
    """A relative path typo or an unknown hub id: no minute of network retries, and (on a
    machine that has not built the default model yet) no build of it first."""
    monkeypatch.setenv("ADVANTAGE_CACHE", str(tmp_path / "cache"))  # a new machine's
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("advantage.engine.hub.hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    base = ["train", "data.train=builtin:reverse"]
    assert _error(capsys, *base, "model.name_or_path=runs/sft/finall") == (
        "model.name_or_path: the folder 'runs/sft/finall' does not exist"
    )
    assert _error(capsys, *base, "model.name_or_path=someone/no-such-model") == (
        "model.name_or_path: the folder 'someone/no-such-model' does not exist, and the hub "
        "(huggingface.co) cannot be reached to download it"
    )
    assert _error(capsys, *base, "model.tokenizer=tokenizers/mine/v2") == (
        "model.tokenizer: the folder 'tokenizers/mine/v2' does not exist"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _error(capsys, *base, "model.name_or_path=someone/no-such-model") == (
        "model.name_or_path: the folder 'someone/no-such-model' does not exist, and hub "
        "downloads are unavailable offline (HF_HUB_OFFLINE)"
    )
    assert _error(capsys, "train", "data.train=data/tran.json") == (
        "data.train: the file or folder 'data/tran.json' does not exist"
    )
    # a built-in tokenizer (built on first use) does not go before the model's typo
    tokenizer = "model.tokenizer=builtin:tiny-reverse"
    assert _error(capsys, *base, tokenizer, "model.name_or_path=runs/sft/finall") == (
        "model.name_or_path: the folder 'runs/sft/finall' does not exist"
    )
    assert time.perf_counter() - start < 45  # not a minute of retries per typo
    assert not (tmp_path / "cache").exists()  # nothing built


@pytest.mark.parametrize("argv", [["--help"], ["eval"], ["card"], ["train", "--steps=3"]])
def test_help_and_argument_errors_do_not_import_torch(argv):
    """`advantage --help` in well under 0.3 s: torch (1.5–2 s to import) is imported on use."""
    code = (
        "import sys\nfrom advantage.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted({'torch', 'transformers', 'numpy'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


class RaisingGym:
    """A gym environment whose step raises (a bug in the user's environment)."""

    def reset(self, row):
        return None

    def step(self, message):
        raise KeyError("no such key")


def test_an_environment_that_raises_is_one_line(tmp_path, capsys, monkeypatch):
    """It was a traceback ending in `EpisodeError: ...` (exit 1), unlike a raising reward."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    err = _error(
        capsys, "train", "model.name_or_path=builtin:tiny-random", "data.train=builtin:reverse",
        f"log.run_dir={tmp_path}", "log.progress=false", "log.tensorboard=false", "eval.size=0",
        "data.eval=null", "rollout.prompts_per_step=1", "rollout.num_generations=2",
        "rollout.max_new_tokens=4", "train.steps=1", "rollout.environment=test_cli_errors:RaisingGym",
    )  # fmt: skip
    assert err.startswith("environment RaisingGym.step raised KeyError in episode ")
