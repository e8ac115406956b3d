"""The processes of one run: the accelerator and its group, and what ends a run from another process.

:func:`make_accelerator` joins the processes a launcher started (a torchrun restart in store keys of
its own: :func:`join_restarted_group`) and refuses a process that would train alone;
:class:`RunProcesses` adds the heartbeat, a main-process check every process agrees on
(:meth:`RunProcesses.agree`), and the messages for a peer that exited or went silent
(:func:`peer_gone`, :func:`timed_out`, :meth:`RunProcesses.timeout_message`). With one process
every collective here does nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list

from supcon.errors import UserError
from supcon.heartbeat import Heartbeat, beat_interval
from supcon.launch import (
    DEFAULT_DIST_TIMEOUT,
    check_not_alone,
    check_restarts_can_meet,
    launched_world_size,
    restart_count,
)


def default_precision() -> str:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def join_restarted_group(world: int, dist_timeout: float) -> None:
    """Join the process group of a torchrun restart (of ``world`` processes) in store keys of its own.

    torchrun's agent keeps one store for the whole launch (``TORCHELASTIC_USE_AGENT_STORE``) and the
    restarted processes meet in it under the same keys as the processes they replace: gloo then finds
    the dead processes' addresses there and fails ("connectFullMesh ... Connection refused") whenever a
    peer reads them before their successor overwrote them. The restart's keys get the restart count as
    prefix (one node: one agent, one count for all its processes; several nodes with a shared store are
    refused by :func:`supcon.launch.check_restarts_can_meet`); Accelerate then uses this group as it finds
    it. A first attempt, or a store of the restart's own, is left to Accelerate.
    """
    attempt = restart_count()
    if not attempt or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or torch.distributed.is_initialized():
        return
    timeout = timedelta(seconds=dist_timeout)
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                       is_master=False, timeout=timeout)
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    own_keys = torch.distributed.PrefixStore(f"supcon/restart_{attempt}", store)
    torch.distributed.init_process_group(backend, store=own_keys, rank=int(os.environ["RANK"]), world_size=world,
                                         timeout=timeout)


def make_accelerator(precision: str, dist_timeout: float = DEFAULT_DIST_TIMEOUT) -> Accelerator:
    """An Accelerator for ``precision``; CPU-only multi-process runs join a gloo group.

    Without ``cpu=True``, ``Accelerator()`` under ``torchrun`` on a CPU-only host leaves each
    process on its own, which would silently train N independent models. ``dist_timeout``: seconds a
    collective may wait for the other processes before it fails.

    Raises:
        UserError: fp16 without a GPU, or a process that a launcher meant as one of several but that
            is alone (:func:`supcon.launch.check_not_alone`) or joined no process group.
    """
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--precision fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU")
    check_not_alone()
    check_restarts_can_meet()
    launched = launched_world_size()
    kwargs: dict[str, Any] = {}
    if launched > 1:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout))]
        if not torch.cuda.is_available():
            kwargs["cpu"] = True
        join_restarted_group(launched, dist_timeout)
    accelerator = Accelerator(mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision], **kwargs)
    if launched > 1 and accelerator.num_processes != launched:
        raise UserError(f"the launcher started {launched} processes, but this one joined a group of "
                        f"{accelerator.num_processes}: it would train a model of its own; check the launch line")
    return accelerator


def peer_gone(exc: BaseException) -> bool:
    """True for the error a collective raises when another process of the group has exited."""
    text = str(exc)
    return isinstance(exc, torch.distributed.DistError) or any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def timed_out(exc: BaseException) -> bool:
    """True for the error a collective raises after waiting ``--dist-timeout`` (gloo: ``Timed out waiting ...``)."""
    return isinstance(exc, (RuntimeError, torch.distributed.DistError)) and bool(
        re.search(r"timed out|timeout", str(exc), flags=re.IGNORECASE))


class RunProcesses:
    """The accelerator of a run, its processes and their heartbeats (several processes only).

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16``.
        dist_timeout: seconds a collective may wait for the other processes (several processes only).
    """

    def __init__(self, precision: str, dist_timeout: float = DEFAULT_DIST_TIMEOUT):
        self.accelerator = make_accelerator(precision, dist_timeout)
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.dist_timeout = dist_timeout
        self.heartbeat: Heartbeat | None = None
        if self.world > 1:
            self.heartbeat = Heartbeat(self.accelerator.process_index, self.world, beat_interval(dist_timeout))
            self.heartbeat.start()
        self.on_gpu = self.accelerator.device.type == "cuda"

    @property
    def device_name(self) -> str:
        return str(self.accelerator.device) + (f" ({torch.cuda.get_device_name()})" if self.on_gpu else "")

    def close(self) -> None:
        """Stop the heartbeat."""
        if self.heartbeat is not None:
            self.heartbeat.stop()

    def broadcast(self, obj, always: bool = False):
        """The main process's ``obj`` on every process (a no-op with one process unless ``always``)."""
        holder = [obj]
        if always or self.world > 1:
            broadcast_object_list(holder)
        return holder[0]

    def agree(self, check: Callable[[], Any]) -> Any:
        """Run ``check`` on the main process; its UserError is raised on every process (its result returned on all).

        Without this, a refusal on the main process would leave the others waiting in the next
        collective.
        """
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", check())
            except UserError as exc:
                outcome = ("error", str(exc))
        outcome = self.broadcast(outcome)
        if outcome[0] == "error":
            raise UserError(outcome[1])
        return outcome[1]

    def mean_over_processes(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device, dtype=torch.float64)
        return float(self.accelerator.reduce(tensor, reduction="mean").item())

    def timeout_message(self, where: str, run_dir: Path | None) -> str:
        """Which peers stopped answering, after a collective waited ``--dist-timeout`` (asks the heartbeats)."""
        silent = self.heartbeat.silent_peers() if self.heartbeat is not None else {}
        if silent:
            names = ", ".join(f"process {rank} (on {host})" for rank, host in sorted(silent.items()))
            what = f"{names} stopped answering (its heartbeat stopped: the process is stopped or frozen, or cut off)"
        elif silent is None:
            what = "the launcher's store does not answer either (the host of the rendezvous may be gone)"
        else:
            what = "every process still has a heartbeat, so one is stuck (a hung collective, a stalled file system)"
        return (f"{where}: waited longer than --dist-timeout {self.dist_timeout:g} s for the others; {what}. The run "
                f"ends; the last good checkpoint in {run_dir} is kept (raise --dist-timeout if a step or a save "
                "can take that long)")
