"""Devices and processes: joining torchrun's process group, picking a device, collectives, RNG states.

With ``WORLD_SIZE`` unset or 1 every function here is a no-op on one process, so the loop has one
code path for one process and for N.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """This process's place in the run: rank, world size, local rank, and whether we started the group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None) -> Dist:
    """Join the process group torchrun describes in the environment (nothing when WORLD_SIZE <= 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def close_distributed(state: Dist) -> None:
    """Leave the process group if ``init_distributed`` started it."""
    if state.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()


def pick_device(device: str | None = None, local_rank: int = 0) -> torch.device:
    """``device`` if given, else this process's GPU when there is one, else the CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, state: Dist) -> torch.Tensor:
    """Sum ``t`` over every process, in place (one process: ``t`` as is)."""
    if state.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def barrier(state: Dist) -> None:
    """Wait for every process (one process: return at once)."""
    if state.world > 1:
        import torch.distributed as dist

        dist.barrier()


def gather_rng_states(state: Dist, device: torch.device) -> dict[str, torch.Tensor]:
    """Every process's RNG states (the CPU generator; CUDA's too when training there), gathered so that
    rank 0's checkpoint can give each process its own dropout stream back on resume. Collective."""
    local = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        local["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for kind, rng in local.items():
        parts = [rng]
        if state.world > 1:
            import torch.distributed as dist

            mine = rng.to(device)  # NCCL gathers device tensors, gloo CPU ones
            parts = [torch.empty_like(mine) for _ in range(state.world)]
            dist.all_gather(parts, mine)
        for rank, part in enumerate(parts):
            out[f"rng.{kind}.rank{rank}"] = part.cpu()
    return out


def restore_rng_states(tensors: dict[str, torch.Tensor], state: Dist, device: torch.device) -> None:
    """Put back this process's RNG states from a checkpoint's ``gather_rng_states`` tensors."""
    mine = f"rng.torch.rank{state.rank}"
    if mine in tensors:
        torch.set_rng_state(tensors[mine])
    elif state.main and "rng.torch" in tensors:  # checkpoints before per-process states
        torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and f"rng.cuda.rank{state.rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{state.rank}"], device)
