"""What the launcher told this process: how many processes and nodes, whether it is a restart, the launch id.

The launchers are torchrun (directly, under ``srun``, or run by ``accelerate launch --multi_gpu``) and
``accelerate launch``; both pass what they decided through environment variables, read here and only
here. torchrun's elastic agent restarts the whole group after a failure (``--max-restarts N``) and tells
the new processes ``TORCHELASTIC_RESTART_COUNT`` (0 on the first attempt): a restarted process resumes
its run from the last state by itself. ``TORCHELASTIC_RUN_ID`` (torchrun's ``--rdzv-id``; a fresh one
per ``--standalone`` launch) names the launch, so that a restart only continues a run its own launch
wrote.
"""

from __future__ import annotations

import os
from typing import Any

from supcon.errors import UserError

#: Seconds a collective (or a silent peer) may keep the others waiting before the run ends (``--dist-timeout``):
#: torch's own default, long enough for a checkpoint save on a slow network file system.
DEFAULT_DIST_TIMEOUT = 1800

#: What the launchers call the number of processes of a run (torchrun; MPI as accelerate reads it).
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun, accelerate launch) started; 1 when run alone."""
    for name in _WORLD_SIZE_VARIABLES:
        if name in os.environ:
            return _int_env(name, 1)
    return 1


def restart_count() -> int:
    """How many times torchrun's elastic agent has restarted this group (0: the first attempt, or no torchrun)."""
    return _int_env("TORCHELASTIC_RESTART_COUNT", 0)


def max_restarts() -> int:
    """torchrun's ``--max-restarts`` (0 without torchrun)."""
    return _int_env("TORCHELASTIC_MAX_RESTARTS", 0)


def launch_id() -> str | None:
    """torchrun's rendezvous id (``--rdzv-id``; random per ``--standalone`` launch); None without torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def check_not_alone() -> None:
    """Refuse a process that a launcher meant as one of several but started alone.

    ``accelerate launch --cpu --num_processes 2`` and ``accelerate launch --num_machines 2`` without
    ``--multi_gpu`` start one plain process per machine, with ``MASTER_ADDR`` set and no world size:
    each would train its own model at its own global batch, and two machines would both write the run.

    Raises:
        UserError: saying which launch line does start the processes.
    """
    started_by_accelerate = any(name.startswith("ACCELERATE_") for name in os.environ)
    told_world_size = any(name in os.environ for name in _WORLD_SIZE_VARIABLES)
    if started_by_accelerate and "MASTER_ADDR" in os.environ and not told_world_size:
        raise UserError("accelerate launch started this process alone although it was asked for several processes or "
                        "machines (MASTER_ADDR is set, no WORLD_SIZE): without --multi_gpu it starts one independent "
                        "process per machine, which would train separate models. Add --multi_gpu (it runs torchrun, "
                        "also on CPUs: gloo), or launch with torchrun")


def check_restarts_can_meet() -> None:
    """Refuse ``torchrun --max-restarts`` on several nodes while torchrun keeps one store for every restart.

    With the store shared (``TORCHELASTIC_USE_AGENT_STORE``, torch's default), restarted processes meet
    under the keys of the processes they replace and may read their dead addresses. On one node this
    process avoids that by itself (the restart count as key prefix: one agent, one count); several
    nodes count restarts apart, so they need torch's fresh store per restart instead.

    Raises:
        UserError: naming the variable to export.
    """
    shared_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if max_restarts() and shared_store and _int_env("GROUP_WORLD_SIZE", 1) > 1:
        raise UserError(f"torchrun --max-restarts {max_restarts()} on {_int_env('GROUP_WORLD_SIZE', 1)} nodes: "
                        "torchrun keeps one store for all restarts, where the restarted processes would meet the "
                        "failed ones' addresses; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun on every "
                        "node (scripts/slurm/torchrun_node.sh does), or launch without --max-restarts")


def launch_facts(processes: int, backend: str | None, dist_timeout: float) -> dict[str, Any]:
    """``run_info["launch"]``: how this session was launched (nodes, processes per node, backend, id, restart)."""
    return {"nodes": _int_env("GROUP_WORLD_SIZE", 1), "processes_per_node": _int_env("LOCAL_WORLD_SIZE", processes),
            "backend": backend, "dist_timeout": dist_timeout, "launch_id": launch_id(), "restart": restart_count(),
            "max_restarts": max_restarts()}
