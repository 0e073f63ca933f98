"""Process-group setup for `torchrun` (DDP / FSDP2 on torch.distributed). In a single process
everything here is a no-op and `world_size == 1`."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.distributed import all_reduce_sum, is_distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group `torchrun` describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
    rank = dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return DistInfo(rank=rank, world_size=dist.get_world_size(), local_rank=local)


def global_sums(values: list[float]) -> list[float]:
    """Python numbers (counts, sums of metrics) summed over all ranks, in float64; the identity
    in one process. A sync point: every rank calls it in the same order."""
    if not is_distributed():
        return values
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def global_mean(values: torch.Tensor) -> float:
    """The mean of every rank's `values` together (float64; NaN when there are none). A sync
    point (one all-reduce)."""
    n, total = global_sums([float(values.numel()), float(values.double().sum())])
    return total / n if n else float("nan")


def global_mean_std(values: torch.Tensor) -> tuple[float, float]:
    """Mean and std (Bessel) of every rank's `values` together (two passes, float64); NaN and
    0 when there are none, std 0 for one. A sync point (two all-reduces)."""
    mean = global_mean(values)
    n, squares = global_sums([float(values.numel()), float(((values.double() - mean) ** 2).sum())])
    if n < 2:
        return mean, 0.0
    return mean, (squares / (n - 1)) ** 0.5


def global_max(value: int) -> int:
    """The largest of every rank's `value`; the identity in one process. A sync point."""
    if not is_distributed():
        return value
    out = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return int(out.item())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (HF's `_no_split_modules` classes), the FSDP2 units."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    return layers


def wrap_model(model: torch.nn.Module, strategy: str, info: DistInfo, trainable: bool = True):
    """DDP (trainable models only; a frozen reference stays a plain replica) or FSDP2
    (`fully_shard` on every decoder layer, then the root: parameters become sharded DTensors)."""
    if not info.enabled:
        return model
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    if not trainable:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.local_rank] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model under a DDP wrapper (FSDP2 modules are the model itself)."""
    return getattr(model, "module", model)


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def average_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over ranks (one all-reduce); identity in one process."""
    if not is_distributed():
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
    values = global_sums([float(metrics[k]) for k in keys])
    world = dist.get_world_size()
    return {**metrics, **{k: v / world for k, v in zip(keys, values, strict=True)}}
