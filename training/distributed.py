"""Process-group setup for data-parallel training: torchrun, OpenMPI and PBS/PMI launches.

Where the rank comes from (first match wins)::

    torchrun / torch.distributed.run   RANK, WORLD_SIZE, LOCAL_RANK (MASTER_ADDR/PORT set by it)
    OpenMPI mpirun                     OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE,
                                       OMPI_COMM_WORLD_LOCAL_RANK
    PMI (MPICH/Intel MPI hydra, PBS)   PMI_RANK, PMI_SIZE; local rank from MPI_LOCALRANKID,
                                       PALS_LOCAL_RANKID or PMI_LOCAL_RANK (else rank mod the
                                       GPUs of the node)
    nothing                            one in-process worker (rank 0 of 1), no process group

AIST's runs use ``mpirun`` on ABCI, which sets no ``MASTER_ADDR``: it is taken from the
environment when the job script exports it (the usual ``export MASTER_ADDR=$(head -1
$PBS_NODEFILE)``), else the first host of ``$PBS_NODEFILE``, else ``127.0.0.1`` for a single-node
launch; ``MASTER_PORT`` defaults to 29500. The values found are written back to the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) so that
``init_process_group("env://")`` and anything else reading them agree.

Backend: ``gloo`` on CPU, ``nccl`` on CUDA (one GPU per process, ``cuda:{local_rank}``). A world
size of 1 never creates a process group: the helpers below then act on the single process.
"""

from __future__ import annotations

import collections
import datetime
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "all_gather_object",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "cleanup",
    "detect",
    "env_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main",
    "select_device",
    "wrap_model",
]

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job.

    Attributes:
        rank, world_size, local_rank: global rank, number of processes, rank within the node.
        master_addr, master_port: rendezvous of rank 0 (``env://``).
        source: which launcher the values came from: ``torchrun``, ``openmpi``, ``pmi`` or
            ``single``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    source: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for n in names:
        v = env.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise ValueError(f"environment variable {n}={v!r} is not an integer") from None
    return None


def _pbs_head(env: Mapping[str, str]) -> str | None:
    path = env.get("PBS_NODEFILE")
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        for line in f:
            if line.strip():
                return line.strip()
    return None


def detect(environ: Mapping[str, str] | None = None) -> DistInfo:
    """Rank, world size, local rank and rendezvous from the launcher's environment variables.

    Args:
        environ: the environment to read (default ``os.environ``).

    Raises:
        ValueError: a non-integer variable, or a rank outside ``[0, world_size)``.
    """
    env = os.environ if environ is None else environ
    if _int(env, "WORLD_SIZE") is not None and _int(env, "RANK") is not None:
        source = "torchrun"
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK")
    elif _int(env, "OMPI_COMM_WORLD_SIZE") is not None:
        source = "openmpi"
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
    elif _int(env, "PMI_SIZE") is not None:
        source = "pmi"
        rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local = _int(env, "MPI_LOCALRANKID", "PALS_LOCAL_RANKID", "PMI_LOCAL_RANK")
    else:
        return DistInfo()
    rank = 0 if rank is None else rank
    assert world is not None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"{source}: rank {rank} is not in [0, world size {world})")
    if local is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        local = rank % gpus if gpus else 0
    addr = env.get("MASTER_ADDR") or _pbs_head(env) or "127.0.0.1"
    port = _int(env, "MASTER_PORT") or DEFAULT_PORT
    return DistInfo(rank, world, local, addr, port, source)


def select_device(info: DistInfo, device: str = "auto") -> torch.device:
    """``auto``: ``cuda:{local_rank}`` when CUDA is available, else CPU; otherwise as given
    (``cpu``, ``cuda``, ``cuda:1``); a bare ``cuda`` means ``cuda:{local_rank}``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        return torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
    return torch.device(device)


def env_rank() -> int:
    """This process's global rank as the launcher's variables give it (0 when there are none or
    they are malformed: for naming messages, not for joining a group)."""
    try:
        return detect().rank
    except ValueError:
        return 0


def init_distributed(
    device: str | torch.device = "auto",
    backend: str | None = None,
    timeout_s: float = 1800.0,
    environ: Mapping[str, str] | None = None,
) -> tuple[DistInfo, torch.device]:
    """Detect the launch, pick the device and, for a world size above 1, join the process group.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or an explicit device (see :func:`select_device`).
        backend: ``gloo`` / ``nccl``; default ``nccl`` on CUDA, ``gloo`` on CPU.
        timeout_s: collective timeout.
        environ: environment to read instead of ``os.environ`` (tests).

    Returns:
        ``(info, device)``. Calling it again in an initialised process returns the same values.
    """
    info = detect(environ)
    dev = device if isinstance(device, torch.device) else select_device(info, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if info.world_size == 1 or (dist.is_available() and dist.is_initialized()):
        return info, dev
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    os.environ.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = dev
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    return info, dev


def cleanup(succeeded: bool = False) -> None:
    """Leave the process group (no-op without one).

    Args:
        succeeded: the run ended normally on this rank: wait for every rank first (a barrier),
            so that no rank tears its group down while another still works with it. After a
            failure, leave at once: the other ranks may never reach a barrier.
    """
    if dist.is_available() and dist.is_initialized():
        if succeeded and _active():
            dist.barrier()
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single-process run)."""
    return get_rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


# The tensors of the last few all-reduces, kept referenced from Python for the life of the
# process. Why: a gloo worker thread drops its own reference to a collective's tensors a moment
# after the collective completes. If Python has dropped the tensor by then, that last reference
# frees a Python object, which needs the GIL. When the process group is destroyed at that moment
# (the last reference to it goes: destroy_process_group, or the DDP reducer freed as run()
# returns), its destructor joins the worker threads while holding the GIL, and the two wait for
# each other for ever (seen in CI: a rank stuck in ~ProcessGroupGloo after its last
# all-reduce). Tensors still referenced here are never freed by a worker thread. They are tiny
# (losses, counts, confusion matrices); the oldest are dropped long after their collective.
_RECENT_COLLECTIVE_TENSORS: collections.deque[torch.Tensor] = collections.deque(maxlen=64)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (every rank must call it); a no-op in a single process.

    The one all-reduce of the package. NCCL only reduces GPU tensors, so under NCCL a CPU tensor
    (a confusion matrix, a sample count) goes through a GPU copy. Use the return value: it is
    ``t`` itself, summed in place, except after such a copy (a new tensor on ``t``'s device).
    """
    if not _active():
        return t
    work = t
    if dist.get_backend() == dist.Backend.NCCL and t.device.type != "cuda":
        work = t.to(torch.device("cuda", torch.cuda.current_device()))
    _RECENT_COLLECTIVE_TENSORS.append(work)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work if work is t else work.to(t.device)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (sum / world size): :func:`all_reduce_sum`, then a division."""
    if not _active():
        return t
    return all_reduce_sum(t).div_(dist.get_world_size())


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, device: torch.device, world_size: int, compile: bool) -> nn.Module:
    """The module a training loop calls: ``model`` under DDP (world size above 1) and
    ``torch.compile`` (``compile``). The optimiser and checkpoints keep using ``model`` itself."""
    wrapped: nn.Module = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Swin's buffers (relative position index, window masks) are constant: no per-forward
        # buffer broadcast (the keyword was renamed in torch 2.12).
        sync_kw = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
            else "broadcast_buffers"
        )
        cuda = device.type == "cuda"
        no_sync: dict[str, Any] = {sync_kw: False}  # a keyword chosen at run time
        wrapped = DDP(model, device_ids=[device.index] if cuda else None, **no_sync)
    if compile:
        wrapped = cast(nn.Module, torch.compile(wrapped))  # compile returns a wrapper module
    return wrapped
