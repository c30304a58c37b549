"""Host <-> device copies that do not make the host wait for the device's queued kernels.

On a GPU, a plain `.to(device)` of a host tensor and a plain `.cpu()` synchronise the stream:
the host stops launching until every queued kernel has run, and the GPU then idles while the
host launches the next ones. A batch that stays free of such copies is queued whole while the
GPU works, so other threads of the process (decoding, post-processing hand-off) cannot starve
the GPU. Elsewhere these functions are plain copies.
"""

from __future__ import annotations

from typing import Callable

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (indices, weights) on device. On CUDA it crosses through pinned
    memory with a non-blocking copy; the pinned block is not reused before the copy has run."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def stack_to_device(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """torch.stack(tensors) of same-shape host tensors, on device. On CUDA the stack is written
    into pinned memory and crosses with a non-blocking copy: the driver stages a copy from
    pageable memory through its own pinned buffers and may wait for the stream's queued
    kernels to do so (CUDA's "API synchronization behavior"), so a batch queued behind a
    running one could wait for that one to finish."""
    if device.type != "cuda":
        return torch.stack(tensors).to(device)
    host = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=True)
    torch.stack(tensors, out=host)
    return host.to(device, non_blocking=True)


def start_copy_to_host(tensor: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
    """Queue a copy of tensor to the host: (host tensor, wait). The host tensor holds the data
    once wait() has returned. On CUDA the copy goes to pinned memory behind an event, so the
    host can go on launching work; elsewhere it is copied at once and wait() returns at once."""
    if tensor.device.type != "cuda":
        return tensor.cpu(), lambda: None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tensor.device))  # the stream the copy went to, on its device
    return host, copied.synchronize
