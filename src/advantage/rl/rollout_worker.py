"""The rollout worker of asynchronous rollouts (`async_rollout.py`): its process samples and
scores batch i with the weights of version max(0, i - k) and sends it to its trainer. A worker
its trainer started leaves Ctrl-C and SIGTERM to the trainer (it needs the worker's batches for
its stop checkpoint) and leaves the error that stopped it in a file the trainer raises from."""

from __future__ import annotations

import pickle
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import Algorithm
from ..engine import checkpoint as ckpt
from ..engine.configlib import ConfigError
from ..engine.data import PromptStream
from ..engine.diverged import DivergedError
from ..engine.environments import EpisodeError
from ..engine.link import Link
from ..engine.models import add_lora, load_causal_lm, load_tokenizer, quiet_transformers
from ..engine.parallel import DistInfo
from ..engine.reward_call import RewardError
from ..engine.rewards import RewardComputer
from ..tasks import dataset_rows, model_paths
from .config import Config, config_from
from .records import RunSizes
from .rewarding import make_reward_computer
from .samplers import load_environment, load_tools, make_backend, make_sampler
from .sampling import rollout_and_score
from .setup import run_sizes, sampling_params


class WorkerError(RuntimeError):
    """The rollout worker stopped: the message says how, and that checkpoints are safe."""


@dataclass
class WorkerSpec:
    """What the worker process is started with (picklable); the rest (the first batch to
    sample, the state to start from) comes over the link from the trainer."""

    config: dict
    reward_funcs: list[Callable] | None
    tools: list[Callable] | None
    environment_factory: Callable | None
    host: str
    port: int
    threads: int
    follow_parent: bool = True
    """Exit when the process that started it ends (a worker spawned by its trainer); its
    trainer alone answers Ctrl-C and SIGTERM (it needs the worker's batches for its stop
    checkpoint), and reads the error that stopped the worker from `error_file`."""
    error_file: str | None = None


@dataclass
class RolloutSide:
    """What sampling and scoring need (`rl/sampling.py`), in the worker's process: a `Run`
    without the reference, critic and optimizers."""

    config: Config
    algo: Algorithm
    sizes: RunSizes
    dist: DistInfo
    prompts: PromptStream
    rewards: RewardComputer
    tokenizer: object
    policy: torch.nn.Module
    backend: object
    sampler: object
    sampling: object

    @property
    def episodic(self) -> bool:
        return self.sampler.episodic


def build_rollout_side(cfg: Config, reward_funcs, tools, environment_factory) -> RolloutSide:
    quiet_transformers()
    rows = dataset_rows(cfg.data.train, "data.train")
    tools = load_tools(cfg, tools)
    environment_factory = load_environment(cfg, environment_factory)
    path, tokenizer_folder = model_paths(cfg.model)
    tokenizer = load_tokenizer(tokenizer_folder, cfg.model.trust_remote_code)
    policy = load_causal_lm(path, cfg.model.trust_remote_code)
    if cfg.model.lora is not None:
        policy = add_lora(policy, cfg.model.lora)  # the same parameters as the trainer's
    backend = make_backend(cfg, policy, tokenizer, path)
    return RolloutSide(
        config=cfg,
        algo=cfg.algorithm_spec(),
        sizes=run_sizes(cfg, 1),
        dist=DistInfo(),
        prompts=PromptStream(rows, cfg.train.seed, cfg.data.shuffle),
        rewards=make_reward_computer(cfg, reward_funcs, environment_factory),
        tokenizer=tokenizer,
        policy=policy,
        backend=backend,
        sampler=make_sampler(cfg, backend, tokenizer, tools, environment_factory, policy),
        sampling=sampling_params(cfg),
    )


def worker_state(side) -> dict:
    """The worker's state after its last batch: RNG, prompt position, reward sources."""
    return {
        "rng": ckpt.rng_state(),
        "prompts": side.prompts.state_dict(),
        "reward_sources": {
            s.name: s.fn.state_dict() for s in side.rewards.sources if hasattr(s.fn, "state_dict")
        },
    }


def restore_worker_state(side, state: dict) -> None:
    ckpt.set_rng_state(state["rng"])
    if "prompts" in state:
        side.prompts.load_state_dict(state["prompts"])
    for source in side.rewards.sources:
        if hasattr(source.fn, "load_state_dict"):
            source.fn.load_state_dict(state.get("reward_sources", {}).get(source.name, {}))


# what a user's code or data did wrong: the trainer raises it as the synchronous loop would
USER_ERRORS = (ConfigError, RewardError, EpisodeError, DivergedError)


def worker_main(spec: WorkerSpec) -> None:
    """The rollout worker's process: sample batch i with version max(0, i - k), send it. An
    error stops it; a local worker leaves the error for its trainer (`error_file`)."""
    if spec.follow_parent:
        _exit_with_parent()
        for signum in (signal.SIGINT, signal.SIGTERM):  # a terminal's Ctrl-C reaches the group
            signal.signal(signum, signal.SIG_IGN)
    try:
        torch.set_num_threads(spec.threads)
        _sample_batches(spec)
    except Exception as e:
        if spec.error_file is None:
            raise
        _leave_error(spec.error_file, e)
        if not isinstance(e, USER_ERRORS):
            raise  # its traceback, for a bug of ours
        sys.exit(1)


def _leave_error(path: str, error: Exception) -> None:
    """`error` pickled into `path` (as a WorkerError with its text if it does not pickle)."""
    try:
        data = pickle.dumps(error)
        pickle.loads(data)
    except Exception:
        data = pickle.dumps(
            WorkerError(f"the rollout worker raised {type(error).__name__}: {error}")
        )
    Path(path).write_bytes(data)


def _sample_batches(spec: WorkerSpec) -> None:
    cfg = config_from(spec.config)
    side = build_rollout_side(cfg, spec.reward_funcs, spec.tools, spec.environment_factory)
    link = Link(spec.host, spec.port, rank=1)
    start = link.recv()  # {"first_batch", "state"} (the state: RNG, prompts, reward sources)
    version = link.pull_weights(side.policy)
    side.backend.sync_weights(side.policy)
    restore_worker_state(side, start["state"])
    k = cfg.train.max_staleness
    for i in range(start["first_batch"], cfg.train.steps):
        waited = time.perf_counter()
        while version < i - k:  # the version this batch must be sampled by
            version = link.pull_weights(side.policy)
            side.backend.sync_weights(side.policy)
        waited = time.perf_counter() - waited
        batch = rollout_and_score(side)
        batch.version = version
        link.send({"index": i, "batch": batch, "state": worker_state(side), "waited": waited})


def _exit_with_parent() -> None:
    """The worker ends when the trainer's process does (even when it was killed)."""
    import os
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
