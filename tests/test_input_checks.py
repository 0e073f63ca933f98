"""Bad input found by adversarial probes: each case was a traceback, a misleading message or a
silent wrong answer, and is now read as written or refused on one line naming the field, the
file or the row (rows of the README's bad-input table)."""

import json
import re
from pathlib import Path

import pytest

from advantage.cli import main
from advantage.engine.configlib import ConfigError
from advantage.engine.data import load_rows
from advantage.rl.config import load_config
from advantage.rl.trainer import Trainer
from helpers import length_reward, small_config

ROOT = Path(__file__).resolve().parents[1]
BOM = b"\xef\xbb\xbf"


def needs_answer(prompts, completions, answer, **kwargs):
    return [0.0] * len(completions)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_files_with_a_utf8_bom_read_as_written(tmp_path):
    # Excel's "CSV UTF-8" starts the file with a BOM: it was the first column's name
    # (KeyError: 'Field "\ufeffprompt" does not exist in schema'); a JSONL file's first line
    # was "not valid JSON" (.json files and YAML configs were read past it already)
    csv = tmp_path / "excel.csv"
    csv.write_bytes(BOM + b"prompt,answer\r\nab>,012\r\ncd>,NA\r\n")
    assert load_rows(str(csv)) == [
        {"prompt": "ab>", "answer": "012"},
        {"prompt": "cd>", "answer": "NA"},
    ]
    jsonl = tmp_path / "notepad.jsonl"
    jsonl.write_bytes(BOM + b'{"prompt": "ab>", "answer": "ba"}\n')
    assert load_rows(str(jsonl)) == [{"prompt": "ab>", "answer": "ba"}]
    # a CSV that is not UTF-8 is refused as a JSONL file is (was a UnicodeDecodeError)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"prompt,answer\ncaf\xe9>,b\n")
    with pytest.raises(ConfigError) as error:
        load_rows(str(latin), "data.eval")
    assert str(error.value) == (
        f"data.eval: {latin}: line 2 (byte 17, b'\\xe9') is not UTF-8 text; save the file as UTF-8"
    )


def test_a_saved_dataset_dict_without_a_train_split_names_its_splits(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_list([{"prompt": "ab>"}]),
            "validation": datasets.Dataset.from_list([{"prompt": "cd>"}]),
        }
    ).save_to_disk(str(folder))
    with pytest.raises(ConfigError) as error:  # was a bare KeyError: 'train'
        load_rows(str(folder))
    assert str(error.value) == (
        f"data.train: {folder} has no 'train' split (splits: test, validation); the rows are read "
        "from its train split: save the split you want on its own "
        "(dataset_dict[NAME].save_to_disk(folder)) and give that folder"
    )
    files = tmp_path / "files"  # a folder of data files (was datasets' 'Unknown split "train"')
    files.mkdir()
    _jsonl(files / "test.jsonl", [{"prompt": "ab>"}])
    with pytest.raises(ConfigError, match=r"^data.eval: .* has no 'train' split \(splits: test\)"):
        load_rows(str(files), "data.eval")
    _jsonl(files / "train.jsonl", [{"prompt": "cd>"}])
    assert load_rows(str(files)) == [{"prompt": "cd>"}]


@pytest.mark.parametrize(
    ("seed", "ok"), [(0, True), (2**32 - 1, True), (2**32, False), (10**20, False), (-1, False)]
)
def test_train_seed_range(seed, ok):
    # 99999999999999999999 was "ValueError: Overflow when unpacking long long" from torch, after
    # the config loaded; NumPy's and vLLM's seeding take 0 .. 2**32 - 1
    if ok:
        assert load_config(None, [f"train.seed={seed}"]).train.seed == seed
        return
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"train.seed={seed}"])
    assert str(error.value) == (
        f"train.seed must be in 0 .. 4294967295 (2**32 - 1, what NumPy's and vLLM's seeding "
        f"take), got {seed}"
    )


def test_sft_and_rm_seed_range(capsys):
    # an overflowing seed passed their check (>= 0) and failed in torch.Generator().manual_seed
    for stage in ("sft", "rm"):
        assert main([stage, "train.seed=99999999999999999999"]) == 2
        assert capsys.readouterr().err == (
            "error: train.seed must be in 0 .. 4294967295 (2**32 - 1, what NumPy's and vLLM's "
            "seeding take), got 99999999999999999999\n"
        )


def test_eval_command_refuses_a_temperature_that_overflows(tmp_path, capsys):
    # 1e-40 made every logit / T infinite: "the policy's next-token logits are not finite ...
    # a diverged update: lower train.lr", about a model that is fine
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "ab>", "answer": "ba"}])
    argv = ["eval", "./no/such/model", str(data), "--pass-k", "2", "--temperature", "1e-40"]
    assert main(argv) == 2  # before the model is looked at
    assert capsys.readouterr().err == (
        "error: --temperature must be a finite number >= 0.01 (logits / temperature overflows "
        "far below it; vLLM raises lower ones to 0.01), got 1e-40\n"
    )


@pytest.mark.slow
def test_a_column_the_eval_file_lacks_names_data_eval_and_its_columns(tmp_path, run_dir):
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": "ab>", "answer": "ba"}] * 2)
    held_out = _jsonl(tmp_path / "eval.jsonl", [{"prompt": "cd>"}])
    overrides = [f"data.train={train}", f"data.eval={held_out}", "eval.size=4"]
    with pytest.raises(ConfigError) as error:  # was "... (columns: none)", not naming data.eval
        Trainer(load_config(None, small_config(run_dir, *overrides)), [needs_answer])
    assert str(error.value) == (
        f"data.eval: reward function 'needs_answer' needs the dataset column(s) ['answer'], "
        f"which data.eval ({held_out}) does not have (its only column is the prompt column "
        "'prompt')"
    )
    held_out = _jsonl(tmp_path / "eval2.jsonl", [{"prompt": "cd>", "solution": "dc"}])
    overrides[1] = f"data.eval={held_out}"
    with pytest.raises(
        ConfigError, match=r"\(columns: solution, and the prompt column 'prompt'\)$"
    ):
        Trainer(load_config(None, small_config(run_dir, *overrides)), [needs_answer])


def _long_prompt(path: Path, n: int = 600) -> Path:
    # the tiny models' tokenizer is one token a character (+ BOS): 602 tokens here
    return _jsonl(path, [{"prompt": "ab" * (n // 2) + ">", "answer": "x"}])


@pytest.mark.slow
def test_eval_prompts_are_checked_as_cut_to_max_prompt_tokens(tmp_path, run_dir):
    held_out = _long_prompt(tmp_path / "long.jsonl")
    base = [f"data.eval={held_out}", "eval.size=1", "data.max_prompt_tokens=100"]
    # sampling cuts held-out prompts to data.max_prompt_tokens: they fit (it was refused with
    # "shorten it or lower eval.max_new_tokens", advice that could not help)
    trainer = Trainer(load_config(None, small_config(run_dir, *base)), [length_reward])
    assert len(trainer.run.sampler.encode(trainer.run.eval_rows[0]["prompt"])) == 100
    trainer.close()
    # cut, but still too long for the evaluation's budget: the advice names data.max_prompt_tokens
    with pytest.raises(ConfigError) as error:
        Trainer(
            load_config(None, small_config(run_dir, *base, "eval.max_new_tokens=500")),
            [length_reward],
        )
    assert str(error.value) == (
        "data.eval: row 0: the prompt has 100 tokens (cut to data.max_prompt_tokens=100); the "
        "model's max_position_embeddings=512 minus eval.max_new_tokens=500 leaves 12; set "
        "data.max_prompt_tokens=12 (cuts prompts from the left), shorten it or lower "
        "eval.max_new_tokens"
    )
    # not cut: the same advice (was "... minus 6 new tokens ...; shorten it or lower
    # eval.max_new_tokens", though eval.max_new_tokens was not set)
    with pytest.raises(ConfigError) as error:
        Trainer(
            load_config(None, small_config(run_dir, f"data.eval={held_out}", "eval.size=1")),
            [length_reward],
        )
    assert str(error.value) == (
        "data.eval: row 0: the prompt has 602 tokens; the model's max_position_embeddings=512 "
        "minus rollout.max_new_tokens=6 leaves 506; set data.max_prompt_tokens=506 (cuts prompts "
        "from the left), shorten it or lower rollout.max_new_tokens"
    )


@pytest.mark.slow
def test_eval_command_checks_prompts_against_the_context(tmp_path, capsys):
    # 802-token prompts on a 512-position model gave eval/accuracy 1.0 without a word, while
    # `train` refused the same file
    data = _long_prompt(tmp_path / "long.jsonl", 800)
    assert main(["eval", "builtin:tiny-random", str(data), "--reward", "exact_match"]) == 2
    assert capsys.readouterr().err == (
        "error: DATASET: row 0: the prompt has 802 tokens; the model's max_position_embeddings=512 "
        "minus --max-new-tokens=64 leaves 448; shorten it or lower --max-new-tokens\n"
    )


def test_rm_reports_its_held_out_pairs_as_a_count(tmp_path):
    from advantage.stages.rm import finished_rm

    # the metrics logger writes numbers as floats: "on 10.0 pairs" was printed
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    records = [
        {"step": 0, "eval/pairwise_accuracy": 0.5, "eval/pairs": 10.0},
        {"step": 2, "eval/pairwise_accuracy": 0.9, "eval/pairs": 10.0, "time/train": 1.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = finished_rm(tmp_path)
    assert stats["eval_pairs"] == 10 and isinstance(stats["eval_pairs"], int)
    assert f"on {stats['eval_pairs']} pairs" == "on 10 pairs"


def test_config_keys_named_in_the_metrics_doc_exist():
    # docs/metrics.md named `algo.loss_name`, which is no config key (it is `algo.objective`)
    from advantage.docs import config_keys
    from advantage.rl.config import Config

    rows = list(config_keys(Config))
    keys = {key for _, key, *_ in rows}
    sections = "|".join(sorted({section for section, *_ in rows if section}))
    text = (ROOT / "docs" / "metrics.md").read_text()
    named = set(re.findall(rf"`((?:{sections})\.[a-z0-9_]+)(?:=[^`]*)?`", text))
    assert named, "the doc names config keys"
    assert sorted(named - keys) == []
