"""The vLLM rollout backend. It runs in the vLLM environment (requirements-vllm.txt): `make test`
runs the rest of the suite in .venv and this file there."""

import pytest
import torch
import vllm  # noqa: F401  (an ImportError outside the vLLM environment, never a silent skip)

from advantage.engine.models import completion_logprobs, load_causal_lm
from advantage.engine.rollout import SamplingParams
from advantage.engine.rollout.vllm import VLLMBackend
from advantage.rl.config import load_config
from advantage.rl.trainer import Trainer
from advantage.tasks import builtin_model_path
from advantage.tasks.tiny import char_tokenizer
from helpers import length_reward, small_config

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def engine():
    path = str(builtin_model_path("tiny-random"))
    tokenizer = char_tokenizer()
    return path, tokenizer, VLLMBackend(path, tokenizer, max_model_len=128)


def test_engine_logprobs_follow_pushed_weights(engine):
    path, tokenizer, backend = engine
    policy = load_causal_lm(path)
    prompts = [tokenizer("abc>")["input_ids"], tokenizer("fed>")["input_ids"]]
    params = SamplingParams(max_new_tokens=8, temperature=0.8, seed=0, ignore_eos=True)

    def gap(model):
        out = backend.generate(prompts, 4, params)
        with torch.no_grad():
            trainer_lp, _ = completion_logprobs(model, out, temperature=0.8)
        return (trainer_lp - out.logprobs)[out.completion_mask].abs().max().item()

    backend.sync_weights(policy)
    assert gap(policy) < 1e-4  # engine and trainer agree on the same weights
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    stale = gap(policy)  # the engine still has the old weights
    backend.sync_weights(policy)
    fresh = gap(policy)
    print(f"max |logprob gap|: stale weights {stale:.3f}, after reload_weights {fresh:.2e}")
    assert stale > 1e-2 and fresh < 1e-4


def test_engine_logprobs_mean_the_trainers_under_top_p_and_top_k(engine):
    """One behaviour distribution on both engines: log softmax(z / T) over the full vocabulary
    (README conventions). vLLM's processed log-probs were renormalised over the top-k / top-p
    set, off by the log of the kept mass."""
    path, tokenizer, backend = engine
    policy = load_causal_lm(path)
    backend.sync_weights(policy)
    prompts = [tokenizer("abc>")["input_ids"], tokenizer("fedab>")["input_ids"]]
    for temperature in (0.7, 1.3):
        params = SamplingParams(
            max_new_tokens=8, temperature=temperature, top_p=0.9, top_k=5, seed=0
        )
        out = backend.generate(prompts, 8, params)
        with torch.no_grad():
            trainer_lp, _ = completion_logprobs(policy, out, temperature=temperature)
        gap = (trainer_lp - out.logprobs)[out.completion_mask].abs().max().item()
        print(f"T={temperature} top_p=0.9 top_k=5: max |engine - trainer| {gap:.2e}")
        assert gap <= 1e-5


def test_training_with_vllm_backend_and_tis(run_dir):
    cfg = load_config(
        None,
        small_config(
            run_dir,
            "rollout.backend=vllm",
            "algo.correction=tis",
            "algo.correction_high=2.0",
            "rollout.vllm={max_model_len: 128}",
        ),
    )
    trainer = Trainer(cfg, reward_funcs=[length_reward])
    result = trainer.fit()
    for m in result.metrics:
        assert m["rollout/logprob_gap"] < 1e-3, m  # weights were pushed after every update
        assert 0 < m["rollout/is_weight_mean"] <= 2.0


def test_calculator_episodes_are_token_exact_on_vllm():
    from test_episodes import episode_token_check

    found = episode_token_check("vllm")
    print(
        f"vLLM episodes: max |engine - trainer| log-prob {found['gap']:.2e}; {found['calls']} calls"
    )
    assert found["gap"] < 1e-4 and found["calls"] > 0


def test_lora_policy_syncs_only_its_adapter_into_vllm(run_dir):
    """model.lora with the vLLM engine: the engine keeps the base weights and takes each
    update's adapter as a LoRA request; its log-probs follow the trained adapter."""
    cfg = load_config(
        None,
        small_config(
            run_dir, "rollout.backend=vllm", "rollout.vllm={max_model_len: 128}",
            "model.lora={r: 8, lora_alpha: 16}", "train.steps=3",
        ),
    )  # fmt: skip
    trainer = Trainer(cfg, reward_funcs=[length_reward])
    result = trainer.fit()
    assert trainer.run.backend.lora and trainer.run.backend._adapters_made >= 4  # start + 3 steps
    for m in result.metrics:
        assert m["rollout/logprob_gap"] < 1e-3, m  # the engine samples with the trained adapter
    rollout = trainer.rollout_and_score().rollout
    with torch.no_grad():
        lp, _ = completion_logprobs(trainer.policy, rollout)
    gap = (lp - rollout.logprobs)[rollout.completion_mask].abs().max().item()
    print(f"LoRA in vLLM: max |engine - trainer| {gap:.2e} after {len(result.metrics)} updates")
    assert gap < 1e-4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"engine_kwargs": {"bogus_option": 1}}, r"rollout.vllm=\{'bogus_option': 1\}.*bogus"),
        ({"lora_rank": 4}, r"model.lora r=4: vLLM takes ranks 1, 8, 16"),
    ],
)
def test_settings_vllm_refuses_are_one_line_config_errors(options, message):
    """A probe: both were vLLM tracebacks (TypeError; pydantic's ValidationError)."""
    from advantage.engine.configlib import ConfigError

    with pytest.raises(ConfigError, match=message):
        VLLMBackend(
            str(builtin_model_path("tiny-random")), char_tokenizer(), max_model_len=64, **options
        )
