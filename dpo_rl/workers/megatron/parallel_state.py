"""torch.distributed and Megatron parallel state for one role's process group.

Each role (actor, reference, reward) runs in its own set of processes; those processes
form one torch.distributed world (gloo on CPU, nccl on CUDA, hccl on NPU) and build
Megatron's TP x PP x DP grid inside it (DP = world / (TP x PP), derived).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from dpo_rl.config.model import ParallelConfig
from dpo_rl.errors import ConfigError
from dpo_rl.workers.megatron.cpu_shim import apply_cpu_shim

logger = logging.getLogger(__name__)

BACKEND_BY_DEVICE = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
_RENDEZVOUS: list = []


@dataclass(frozen=True)
class ParallelRanks:
    """Where this process sits in the Megatron grid."""

    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_output_rank(self) -> bool:
        """TP rank 0 of the last pipeline stage: the rank whose outputs are collected."""
        return self.tp_rank == 0 and self.is_last_stage


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` (an address of this machine) now, for a rendezvous."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Rendezvous:
    """A TCP store for a process group's rendezvous; the host's listens on one address only."""

    store: dist.TCPStore
    address: str
    port: int
    listener: Optional[socket.socket] = None  # the bound socket the hosting store accepts on


def host_store(address: str, port: int = 0, timeout_s: float = 600.0) -> Rendezvous:
    """Host a TCP store on ``address``:``port`` (0 = a free port) and nowhere else.

    ``TCPStore`` alone listens on every interface; handed a socket already bound to the address
    (``master_listen_fd``), it accepts there only.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen()
    port = listener.getsockname()[1]
    store = dist.TCPStore(address, port, None, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
                          master_listen_fd=listener.fileno())
    return Rendezvous(store, address, port, listener)


def connect_store(address: str, port: int, timeout_s: float = 600.0) -> Rendezvous:
    store = dist.TCPStore(address, port, None, False, datetime.timedelta(seconds=timeout_s))
    return Rendezvous(store, address, port)


def interface_of(address: str) -> Optional[str]:
    """The name of this machine's network interface that holds ``address`` (``lo`` for 127.0.0.1)."""
    import psutil  # deferred: only process-group set-up needs it (a Ray dependency)

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addresses):
            return name
    return None


def pin_collective_interface(local_address: str, device: str) -> Optional[str]:
    """Make gloo (or NCCL's bootstrap) open its sockets on ``local_address``'s interface only, unless the
    user chose one (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``); returns the interface used."""
    variable = "NCCL_SOCKET_IFNAME" if device == "cuda" else "GLOO_SOCKET_IFNAME"
    if os.environ.get(variable):
        return os.environ[variable]
    interface = interface_of(local_address)
    if interface is None:
        logger.warning("no network interface of this machine holds %s; %s left unset", local_address, variable)
        return None
    os.environ[variable] = interface
    logger.info("process group sockets on %s (%s, %s=%s)", local_address, device, variable, interface)
    return interface


def torch_device(device: str) -> torch.device:
    """The torch device this process computes on (``cuda:<current>`` / ``npu:<current>``)."""
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if device == "npu":
        return torch.device("npu", torch.npu.current_device())  # type: ignore[attr-defined]
    return torch.device("cpu")


def init_distributed(
    parallel: ParallelConfig,
    rank: int,
    world_size: int,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    timeout_s: float = 600.0,
    local_address: Optional[str] = None,
) -> ParallelRanks:
    """Initialise torch.distributed and Megatron's parallel state for this process.

    Rank 0 hosts the rendezvous store on ``master_addr`` only (not every interface); every rank's
    collective sockets use the interface of ``local_address`` (its own node address; default
    ``master_addr``). On CPU the megatron-core CPU shim is applied first. Raises
    :class:`ConfigError` when the world size is not a multiple of TP x PP.
    """
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ConfigError(
            [f"world size ({world_size}) must be a multiple of tensor_model_parallel_size x "
             f"pipeline_model_parallel_size ({tp} x {pp}); change the role's process count or TP/PP"]
        )
    if parallel.device == "cpu":

        apply_cpu_shim()
    elif parallel.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))

    if not dist.is_initialized():
        pin_collective_interface(local_address or master_addr, parallel.device)
        rendezvous = (host_store(master_addr, master_port, timeout_s) if rank == 0
                      else connect_store(master_addr, master_port, timeout_s))
        _RENDEZVOUS.append(rendezvous)  # the hosting store must outlive the process group's set-up
        dist.init_process_group(
            backend=BACKEND_BY_DEVICE[parallel.device],
            store=rendezvous.store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )

    from megatron.core import parallel_state as mpu  # deferred: heavy (megatron-core)

    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
        )
    return current_ranks()


def current_ranks() -> ParallelRanks:
    """This process's position in the initialised Megatron grid."""
    from megatron.core import parallel_state as mpu  # deferred: heavy (megatron-core)

    return ParallelRanks(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp_size=mpu.get_tensor_model_parallel_world_size(),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_size=mpu.get_pipeline_model_parallel_world_size(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_size=mpu.get_data_parallel_world_size(),
        dp_rank=mpu.get_data_parallel_rank(),
    )


def seed_everything(seed: int, device: str) -> None:
    """Seed torch (and Megatron's CUDA RNG tracker on GPU) identically on every TP rank."""
    torch.manual_seed(seed)
    if device == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # deferred: heavy (megatron-core)

        model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down Megatron's parallel state and the process group (tests, shutdown)."""
    from megatron.core import parallel_state as mpu  # deferred: heavy (megatron-core)

    mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _RENDEZVOUS.clear()
