"""Every distributed concern in one place: rank, world size, all-reduces, and how the model is replicated.

Single-process code calls these too; without an initialised process group they are identities, so the trainer
has one code path for 1 and N workers (Ray Train sets up the process group, see ray_jobs/train_rm.py).
:class:`Replication` is the trainer's only view of DDP / FSDP2: it wraps the model, says how many forward passes a
rank runs in a step, opens the gradient-sync context of each pass, and gathers full state dicts for checkpoints.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

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


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


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


def load_full_state_dicts(
    model: torch.nn.Module, model_sd: dict, optimizer=None, optim_sd=None, strict: bool = True
) -> None:
    """Load full state dicts (the same on every rank) into an FSDP model and its optimizer; ``strict=False`` for a
    partial ``model_sd`` (a LoRA checkpoint holds the adapters and the head; the frozen base is already loaded)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(model, model_sd, options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)


class Replication:
    """How a model is spread over the ranks: ``"single"`` (one process), ``"ddp"`` or ``"fsdp"`` (FSDP2).

    Args:
        model: the module to train (already on its device). With ``fsdp`` it is sharded in place.
        layers: its decoder blocks (FSDP's sharding units), or a function returning them (called only for FSDP).
        fsdp: shard parameters, gradients and optimizer state instead of replicating them (only when distributed).
    """

    def __init__(self, model: torch.nn.Module, layers, device: torch.device, fsdp: bool = False):
        self.model = model
        self.kind = "fsdp" if fsdp and is_distributed() else "ddp" if is_distributed() else "single"
        self.module = model  # what the gradient passes call
        if self.kind == "fsdp":
            shard_fsdp2(model, layers() if callable(layers) else layers)
        elif self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # broadcast_buffers=False: the only buffers are RoPE tables, equal on every rank; broadcasting them at
            # each forward would add a collective per pass, and ranks run different numbers of passes.
            self.module = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    def num_passes(self, local: int) -> int:
        """Forward passes this rank runs in a step holding ``local`` micro-batches. DDP: at least one, so every
        rank joins the gradient all-reduce; FSDP: the maximum over ranks, because every forward all-gathers
        parameters collectively (one needed host sync per step)."""
        if self.kind == "fsdp":
            return int(all_reduce_max(torch.tensor([float(local)], device=_device_of(self.model))).item())
        return max(local, 1) if self.kind == "ddp" else local

    @contextmanager
    def gradient_pass(self, last: bool) -> Iterator[None]:
        """Context of one backward pass: gradients are reduced across ranks only after the last pass of a step."""
        if self.kind == "fsdp":
            self.model.set_requires_gradient_sync(last)
            yield
        else:
            with self.module.no_sync() if self.kind == "ddp" and not last else nullcontext():
                yield

    def full_state(self, optimizer=None) -> tuple[dict | None, dict | None]:
        """(model, optimizer) full state dicts on rank 0 when sharded (collective); (None, None) otherwise, meaning
        the local ``state_dict()``s are already full."""
        if self.kind != "fsdp":
            return None, None
        return full_state_dicts(self.model, optimizer)

    def load_full_state(
        self, model_sd: dict, optimizer=None, optim_sd: dict | None = None, strict: bool = True
    ) -> None:
        load_full_state_dicts(self.model, model_sd, optimizer, optim_sd, strict)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
