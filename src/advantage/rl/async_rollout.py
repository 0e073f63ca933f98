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
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from ..engine import checkpoint as ckpt
from ..engine.configlib import ConfigError, host_port
from ..engine.link import BEFORE_CONNECTING, Link, PeerGone, free_port
from .config import Config
from .records import ScoredRollout, TrainState
from .rollout_worker import WorkerError, WorkerSpec, worker_main
from .setup import Run


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
            host, port = host_port(address)
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
        alive = None if address else self.process.is_alive  # a worker that dies first: say so
        self.link = self._guard(lambda: Link("0.0.0.0" if address else host, port, 0, alive))
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
                if str(e) == BEFORE_CONNECTING:  # it never ran worker_main's error handling
                    raise WorkerError(
                        f"the rollout worker {how} before it connected (its "
                        "error is printed above; a script that trains with "
                        "train.max_staleness must start training under "
                        "`if __name__ == '__main__':`, as the worker process imports it)"
                    ) from None
            raise WorkerError(
                f"the rollout worker {how}; checkpoints already written are intact: run the "
                "same command again to resume"
            ) from None


def run_remote_worker(config: Config, address: str, threads: int | None = None) -> None:
    """`advantage rollout-worker CONFIG --connect HOST:PORT`: a worker on another machine (its
    engine, e.g. vLLM on a GPU node), connecting to a trainer that waits at HOST:PORT."""
    host, port = host_port(address)
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
