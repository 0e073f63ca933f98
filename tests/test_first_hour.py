"""A new user's first hour: what a user doing a task of their own meets first (issue 13, rows
14–18). Each case is a row of the README's bad-input table."""

import pytest

from advantage.cli import main
from advantage.engine.configlib import ConfigError
from advantage.engine.configlib import load_config as load_stage_config
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
