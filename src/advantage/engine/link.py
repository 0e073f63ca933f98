"""A channel between two processes over a `torch.distributed` process group of their own (gloo;
its own `TCPStore` rendezvous), used by asynchronous rollouts: the trainer pushes weights to the
rollout worker and the worker sends scored batches back. Nothing of ours goes over a socket:
objects travel as pickled bytes in tensors, weights as one flat tensor per push.

Independent of the default process group, so the trainer ranks' own group (DDP / FSDP2 under
torchrun) is untouched.
"""

from __future__ import annotations

import datetime
import pickle
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

OBJECT, WEIGHTS = 1, 2  # message tags
_JOINED = "advantage/peer-joined"  # set by rank 1 once connected to the store
BEFORE_CONNECTING = "it ended before connecting"


class PeerGone(RuntimeError):
    """The other side of a link stopped answering (it exited, crashed, or was killed)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Link:
    """Rank 0 (the trainer, hosting the rendezvous) or rank 1 (the rollout worker)."""

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        alive: Callable[[], bool] | None = None,
        timeout_s: float = 1800.0,
    ) -> None:
        """`alive` (rank 0): whether the peer's process still runs; one that ends before it
        connects raises PeerGone at once (else rank 0 would wait out `timeout_s`)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.peer = rank, 1 - rank
        waits = rank == 1 or alive is None
        self.store = dist.TCPStore(
            host, port, 2, rank == 0, timeout=timeout, wait_for_workers=waits
        )
        if rank == 1:
            self.store.set(_JOINED, "1")
        elif alive is not None:
            deadline = time.monotonic() + timeout_s
            while not self.store.check([_JOINED]):
                if not alive():
                    raise PeerGone(BEFORE_CONNECTING)
                if time.monotonic() > deadline:
                    raise PeerGone(f"it did not connect within {timeout_s:g} s")
                time.sleep(0.05)
        self.group = dist.ProcessGroupGloo(self.store, rank, 2, timeout)
        self._pending: list = []  # (work, buffer) of sends still in flight

    # -- objects --------------------------------------------------------------------------

    def send(self, obj) -> None:
        """Send a picklable object (blocks until the peer has it)."""
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()])
        self._wait(self._call(self.group.send, [size], self.peer, OBJECT))
        self._wait(self._call(self.group.send, [payload], self.peer, OBJECT))

    def recv(self):
        size = torch.zeros(1, dtype=torch.int64)
        self._wait(self._call(self.group.recv, [size], self.peer, OBJECT))
        payload = torch.empty(int(size), dtype=torch.uint8)
        self._wait(self._call(self.group.recv, [payload], self.peer, OBJECT))
        return pickle.loads(payload.numpy().tobytes())

    # -- weights ---------------------------------------------------------------------------

    def push_weights(self, version: int, model: torch.nn.Module) -> None:
        """Send the model's parameters (a flat float32 snapshot) without waiting for the peer:
        the sender goes on training while the worker is busy. Each push keeps its snapshot
        until the peer has received it (the peer takes them in order, when it needs them)."""
        self._pending = [
            (work, buffer) for work, buffer in self._pending if not work.is_completed()
        ]
        flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
        header = torch.tensor([version, flat.numel()], dtype=torch.int64)
        self._pending += [
            (self._call(self.group.send, [header], self.peer, WEIGHTS), header),
            (self._call(self.group.send, [flat], self.peer, WEIGHTS), flat),
        ]

    def pull_weights(self, model: torch.nn.Module) -> int:
        """Receive the next push into `model`'s parameters; its version."""
        header = torch.zeros(2, dtype=torch.int64)
        self._wait(self._call(self.group.recv, [header], self.peer, WEIGHTS))
        version, numel = (int(x) for x in header)
        flat = torch.empty(numel, dtype=torch.float32)
        self._wait(self._call(self.group.recv, [flat], self.peer, WEIGHTS))
        offset = 0
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        if offset != numel:
            raise RuntimeError(f"pushed weights have {numel} numbers, the model {offset}")
        return version

    def flush(self) -> None:
        """Complete the sends in flight."""
        for work, _buffer in self._pending:
            self._wait(work)
        self._pending = []

    @staticmethod
    def _call(operation, *args):
        """A send or receive; a peer that is gone raises `PeerGone`."""
        try:
            return operation(*args)
        except RuntimeError as e:
            raise PeerGone(str(e).splitlines()[0]) from None

    def _wait(self, work) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            raise PeerGone(str(e).splitlines()[0]) from None
