"""Multi-process training through PyTorch's own engine: torchrun sets RANK, WORLD_SIZE
and LOCAL_RANK; we start the process group (gloo on CPU, nccl on CUDA) with a bounded
collective timeout so that a dead rank ends the others with an error instead of a hang."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vggkit.errors import UsageError

log = logging.getLogger(__name__)

# Seconds a collective may wait for a missing rank. Overridable for slow clusters.
DEFAULT_TIMEOUT_S = 120
DEFAULT_DATA_TIMEOUT_S = 6 * 3600  # a first CIFAR download or zip decode, on a slow link


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_seconds(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        seconds = int(raw)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise UsageError(f"${name}={raw!r}: must be a whole number of seconds above 0")
    return seconds


def timeout_seconds() -> int:
    return _env_seconds("VGGKIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        # On GPUs, NCCL for CUDA tensors and gloo for the CPU ones (the epoch's sums, object
        # collectives): NCCL alone serves only CUDA tensors, and a CPU all-reduce would fail
        # at the end of the first epoch.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=timeout_seconds())
        )
        log.debug("rank %d/%d joined (%s)", info.rank, world, backend)
    return info


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value, info: DistInfo):
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value, info: DistInfo) -> list:
    if not info.enabled:
        return [value]
    out = [None] * info.world_size
    dist.all_gather_object(out, value)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def data_timeout_seconds() -> int:
    return _env_seconds("VGGKIT_DATA_TIMEOUT", DEFAULT_DATA_TIMEOUT_S)


def data_wait_group(info: DistInfo):
    """A gloo group whose only use is to wait for the data: a first download or decode
    takes minutes, far past the collectives' timeout (--dist timeout). Every rank must
    create it, before any of them starts preparing data."""
    if not info.enabled:
        return None
    return dist.new_group(backend="gloo",
                          timeout=datetime.timedelta(seconds=data_timeout_seconds()))


def wait_for_data(info: DistInfo, group) -> None:
    """Every node's preparer (local rank 0) is done: the data is in each node's cache."""
    if info.enabled:
        dist.barrier(group=group)


def release_data_group(info: DistInfo, group) -> None:
    if info.enabled:
        dist.destroy_process_group(group)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when it is true on one (e.g. a stop signal that reached only
    some of them): all ranks then leave the loop at the same step."""
    if not info.enabled:
        return flag
    box = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":  # a group started elsewhere with NCCL alone
        box = box.cuda()
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
