"""Every distributed concern in one place: rank, world size, all-reduce of sums.

Single-process code calls these too; without an initialised process group they are identities, so the trainer
has one code path for 1 and N workers (Ray Train sets up the process group, see ray_jobs/train_rm.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place where distributed) and return it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of a tensor over all ranks (in place where distributed) and return it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's object on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_fsdp2(model: torch.nn.Module, layers) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 over all ranks: each of ``layers`` (the decoder blocks), then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def full_state_dicts(model: torch.nn.Module, optimizer=None):
    """Full (unsharded) model and optimizer state dicts of an FSDP model, on CPU, on rank 0 (empty elsewhere).
    Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def load_full_state_dicts(model: torch.nn.Module, model_sd: dict, optimizer=None, optim_sd=None) -> None:
    """Load full state dicts (the same on every rank) into an FSDP model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
