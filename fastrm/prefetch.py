"""Host work of the next optimizer step, overlapped with the device work of this one.

Packing a step (the objective's ``micro_batches``: first-fit-decreasing bins, index and ``cu_seqlens`` arrays, the
attention plan) is Python and small CPU tensor work. Done between steps it leaves the GPU idle; done on a background
thread while step k runs, step k+1 is ready when k ends. The main thread waits on the GPU at the end of every step
(the step's metrics reach the host once, fastrm.trainer.train_step), and that wait releases the GIL for the packer.

On CUDA the packed tensors are pinned on the packing thread, so the main thread's ``.to(device, non_blocking=True)``
is an asynchronous copy instead of a staged, blocking one. The batches are the same either way: packing depends
only on the step's pairs (tests/test_prefetch.py checks identical weights and metrics with and without).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

import torch

T = TypeVar("T")


@dataclass
class HostStep:
    """One optimizer step, prepared on the host.

    Attributes:
        pairs: this rank's share of the step's examples.
        n_global: the step's normaliser over all ranks (``objective.step_units`` of the whole step).
        batches: this rank's packed micro-batches, on the host (pinned when training on CUDA).
        n_examples: the step's examples over all ranks.
    """

    pairs: list
    n_global: int
    batches: list
    n_examples: int


def pin_batch(batch):
    """``batch`` (a PackedBatch or subclass) with every tensor field, and its attention plan's, in pinned memory."""
    from fastrm.packing import map_tensors

    return map_tensors(batch, torch.Tensor.pin_memory)


class StepPrefetcher(Generic[T]):
    """``get(k)`` returns ``make(k)``; ``prefetch(k)`` starts ``make(k)`` on one background thread so a later
    ``get(k)`` only waits for what is left. Disabled, ``get`` runs ``make`` in the caller. An exception raised by
    ``make`` on the thread is raised by ``get`` in the caller, unchanged (a bad row names its file and line).
    ``prefetch``, ``get`` and ``close`` are called from one thread (the training loop); only ``make`` runs on the
    background one."""

    def __init__(self, make: Callable[[int], T], enabled: bool = True):
        self._make = make
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fastrm-pack") if enabled else None
        self._pending: dict[int, Future] = {}

    def prefetch(self, step: int) -> None:
        if self._pool is not None and step not in self._pending:
            self._pending[step] = self._pool.submit(self._make, step)

    def get(self, step: int) -> T:
        fut = self._pending.pop(step, None)
        return self._make(step) if fut is None else fut.result()

    def close(self) -> None:
        """Drop what was prefetched and not taken; wait for a running ``make`` to end."""
        if self._pool is None:
            return
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)
        self._pool = None

    def __enter__(self) -> "StepPrefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
