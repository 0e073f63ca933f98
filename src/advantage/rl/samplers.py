"""The rollout side of a run's setup: the engine, the tools and environment of episodes, and
the sampler that turns prompts into samples (one turn, or multi-turn episodes)."""

from __future__ import annotations

from collections.abc import Callable

from ..engine.configlib import ConfigError, import_object
from ..engine.data import encode_prompt
from ..engine.environments import callable_tools
from ..engine.episodes import Episodes, EpisodeSettings
from ..engine.parallel import is_fsdp, unwrap
from ..engine.rollout import TransformersBackend
from ..engine.sampling import SingleTurn
from ..engine.sandbox import make_python_tool
from ..engine.tools import ToolCallParser, tool_schema
from ..tasks import task_of
from .config import Config


def load_environment(cfg: Config, environment_factory: Callable | None) -> Callable | None:
    """The environment class: the Python API's, or `rollout.environment`'s."""
    if environment_factory is None and cfg.rollout.environment:
        return import_object(cfg.rollout.environment, "rollout.environment")
    return environment_factory


def make_backend(cfg: Config, policy, tokenizer, policy_path: str):
    if cfg.rollout.backend == "vllm":
        from ..engine.rollout.vllm import VLLMBackend

        limit = getattr(policy.config, "max_position_embeddings", 2048)
        backend = VLLMBackend(
            policy_path,
            tokenizer,
            precision=cfg.model.precision,
            seed=cfg.train.seed,
            max_model_len=min(2048, limit),
            engine_kwargs=cfg.rollout.vllm,
            lora_rank=None if cfg.model.lora is None else cfg.model.lora.get("r", 8),
        )
        backend.sync_weights(policy)  # the policy may differ from the folder (resume, LoRA)
        return backend
    # FSDP2: every forward is collective, so every rank must run the same decode steps
    return TransformersBackend(policy, tokenizer, cfg.model.precision, lockstep=is_fsdp(policy))


def load_tools(cfg: Config, given: list[Callable] | None = None) -> list[Callable]:
    """The tools: the Python API's (`given`), or `rollout.tools`' — dotted paths, `python` (the
    sandbox), `builtin` (the task's tools)."""
    if given is not None:
        return list(given)
    tools = []
    for spec in cfg.rollout.tools:
        if spec == "python":
            tools.append(make_python_tool())
        elif spec == "builtin":
            task = task_of(cfg.data.train)
            if task is None or not getattr(task, "tools", None):
                raise ConfigError("rollout.tools: 'builtin' needs a built-in task with tools")
            tools += task.tools
        else:
            tools.append(import_object(spec, "rollout.tools"))
    return tools


def make_sampler(cfg: Config, backend, tokenizer, tools, environment_factory, policy=None):
    """One turn, or episodes when there are tools or an environment (which never run past the
    `policy`'s `max_position_embeddings`)."""
    r = cfg.rollout
    # a TRL environment's methods are tools
    schemas = [tool_schema(f) for f in callable_tools(tools, environment_factory)]

    def encode(prompt) -> list[int]:
        # the chat template renders the schemas of every tool the model may call
        return encode_prompt(
            tokenizer, prompt, cfg.data.system_prompt, cfg.data.max_prompt_tokens, schemas or None
        )

    if not tools and environment_factory is None:
        return SingleTurn(backend, tokenizer, encode)
    config = getattr(unwrap(policy), "config", None) if policy is not None else None
    context = getattr(config, "max_position_embeddings", None)
    settings = EpisodeSettings(r.max_turns, r.max_episode_tokens, r.reply_template, context)
    return Episodes(
        backend,
        tokenizer,
        encode,
        settings,
        tools=tools,
        environment_factory=environment_factory,
        parser=ToolCallParser(r.tool_call_format, stop=r.tool_call_stop, schemas=schemas),
        tool_timeout=r.tool_timeout,
        tool_max_output=r.tool_max_output,
    )
