"""Asynchronous rollouts (SPEC §7 "Overlap"): a rollout worker samples and scores the next
batches with its own engine while the trainer trains on the current one.

**Schedule.** Batch i is sampled by the weights of version max(0, i - k), k =
`train.max_staleness` (version v = the weights after v updates): the worker waits for that
version, never uses an older one, and runs at most k batches ahead. The lag is therefore
deterministic — exactly min(i, k) — and so are the runs: k = 0 is the synchronous loop, sample
for sample (the worker starts from the trainer's RNG state), and k = 1 overlaps each update with
the next batch's sampling. An episode is always finished by the version that started it (the
worker takes new weights only between batches).

**Importance weights.** A batch sampled by an older version keeps that version's log-probs (the
engine's) as the behaviour policy; the trainer's forward pass at the start of the step is the
proximal `old_logprobs` of the clipped ratio, and `algo.correction` (TIS / MIS) weights
π_old / π_behaviour (the decoupled objective of AReaL, arXiv:2505.24298). Every batch logs its
`async/staleness`.

**Channel.** Weights go trainer → worker and batches worker → trainer over a `torch.distributed`
gloo process group of their own (`engine/link.py`). The worker is a process the trainer starts
(`multiprocessing` spawn, `distributed.rollout_threads` threads).

**Checkpoints** hold the queue: at a checkpoint after step s the trainer first receives batches
s .. s+k-1 (all sampled by versions < s) and saves them with the worker's state after the last
one (RNG, prompt position, reward sources); a resumed run consumes them and restarts the worker
from that state with the weights of version s — as exact as a resumed synchronous run.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
import signal
import sys
import tempfile
import time
from collections import deque
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
from ..engine.link import Link, PeerGone, free_port
from ..engine.models import add_lora, load_causal_lm, load_tokenizer, quiet_transformers
from ..engine.parallel import DistInfo
from ..engine.reward_call import RewardError
from ..engine.rewards import RewardComputer
from ..tasks import dataset_rows, model_path, tokenizer_path
from .config import Config, config_from
from .records import RunSizes, ScoredRollout, TrainState
from .rewarding import make_reward_computer
from .samplers import load_environment, load_tools, make_backend, make_sampler
from .sampling import rollout_and_score
from .setup import Run, run_sizes, sampling_params


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
    path = model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(
        tokenizer_path(cfg.model.tokenizer, path), cfg.model.trust_remote_code
    )
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
    torch.set_num_threads(spec.threads)
    if spec.follow_parent:
        _exit_with_parent()
        for signum in (signal.SIGINT, signal.SIGTERM):  # a terminal's Ctrl-C reaches the group
            signal.signal(signum, signal.SIG_IGN)
    try:
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


class AsyncRollouts:
    """The trainer's side: starts the worker, receives batches in order, pushes weights."""

    def __init__(
        self,
        run: Run,
        state: TrainState,
        reward_funcs: list[Callable] | None,
        tools: list[Callable] | None,
        environment_factory: Callable | None,
        saved: dict | None = None,
    ) -> None:
        cfg = run.config
        self.run, self.k = run, cfg.train.max_staleness
        self.queue: deque[ScoredRollout] = deque(
            ScoredRollout.from_state(b) for b in (saved or {}).get("queue", [])
        )
        self.last_state = (saved or {}).get("worker") or {"rng": ckpt.rng_state()}
        self.worker_seconds: dict[int, float] = {}
        self.process = self.error_file = None
        address = cfg.distributed.rollout_address
        if address:  # a worker started elsewhere (`advantage rollout-worker`) connects here
            host, port = _host_port(address)
        else:  # this machine: start the worker
            host, port = "127.0.0.1", free_port()
            self.error_file = Path(tempfile.mkstemp(prefix="advantage-worker-error-")[1])
            spec = WorkerSpec(
                config=dataclasses.asdict(cfg),
                reward_funcs=reward_funcs,
                tools=tools,
                environment_factory=environment_factory,
                host=host,
                port=port,
                threads=cfg.distributed.rollout_threads or max(1, torch.get_num_threads() // 2),
                error_file=str(self.error_file),
            )
            context = multiprocessing.get_context("spawn")
            self.process = context.Process(target=worker_main, args=(spec,), daemon=True)
            self.process.start()
        self.link = Link("0.0.0.0" if address else host, port, rank=0)
        start = {"first_batch": state.step + len(self.queue), "state": self.last_state}
        self._guard(lambda: self.link.send(start))
        self.link.push_weights(state.step, run.policy)

    def next_batch(self, step: int) -> tuple[ScoredRollout, dict[str, float]]:
        """Batch `step` and its metrics (staleness, waits)."""
        wait = time.perf_counter()
        if not self.queue:
            self._receive(step)
        batch = self.queue.popleft()
        metrics = {
            "async/staleness": float(step - batch.version),
            "async/trainer_wait": time.perf_counter() - wait,
            "async/worker_wait": self.worker_seconds.pop(step, 0.0),
        }
        return batch, metrics

    def pushed(self, version: int) -> None:
        """After an update: the worker may sample with the new weights — pushed only when a
        batch still to sample needs them (batch i needs version i - k)."""
        if version <= self.run.config.train.steps - 1 - self.k:
            self._guard(lambda: self.link.push_weights(version, self.run.policy))

    def checkpoint_state(self, step: int) -> dict:
        """The queue for a checkpoint after `step` updates: batches step .. step+k-1."""
        while len(self.queue) < min(self.k, self.run.config.train.steps - step):
            self._receive(step + len(self.queue))
        return {"queue": [b.to_state() for b in self.queue], "worker": self.last_state}

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()  # it ignores SIGTERM (its trainer answers it)
            self.process.join(timeout=10)
        if self.error_file is not None:
            self.error_file.unlink(missing_ok=True)

    def _receive(self, index: int) -> None:
        message = self._guard(self.link.recv)
        if message["index"] != index:
            raise WorkerError(f"rollout worker sent batch {message['index']}, expected {index}")
        self.queue.append(message["batch"])
        self.last_state = message["state"]
        self.worker_seconds[index] = message["waited"]

    def _guard(self, call):
        try:
            return call()
        except PeerGone as e:
            how = f"stopped answering ({e})"
            if self.process is not None:
                self.process.join(timeout=5)
                left = self.error_file.read_bytes() if self.error_file.is_file() else b""
                if left:  # what stopped it: raised here as the synchronous loop raises it
                    raise pickle.loads(left) from None
                code = self.process.exitcode
                how = (
                    f"(pid {self.process.pid}) was killed by {signal.Signals(-code).name}"
                    if code is not None and code < 0
                    else f"(pid {self.process.pid}) exited with code {code}"
                )
            raise WorkerError(
                f"the rollout worker {how}; checkpoints already written are intact: run the "
                "same command again to resume"
            ) from None


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"distributed.rollout_address: {address!r} is not HOST:PORT (e.g. 10.0.0.2:29600)"
        )
    return host, int(port)


def run_remote_worker(config: Config, address: str, threads: int | None = None) -> None:
    """`advantage rollout-worker CONFIG --connect HOST:PORT`: a worker on another machine (its
    engine, e.g. vLLM on a GPU node), connecting to a trainer that waits at HOST:PORT."""
    host, port = _host_port(address)
    spec = WorkerSpec(
        config=dataclasses.asdict(config),
        reward_funcs=None,
        tools=None,
        environment_factory=None,
        host=host,
        port=port,
        threads=threads or torch.get_num_threads(),
        follow_parent=False,
    )
    worker_main(spec)


def check_async(cfg: Config, world_size: int) -> None:
    if cfg.train.max_staleness is not None and world_size > 1:
        raise ConfigError(
            "train.max_staleness (asynchronous rollouts) runs one trainer process with its "
            "rollout worker; under torchrun use the synchronous loop (train.max_staleness=null)"
        )
