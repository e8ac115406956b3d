"""``baseline-train --init-from``: start the supervised fine-tune from a SupCon run's encoder.

``--init-from RUN`` takes the checkpoint that probe-all's default selection rule chose on val
(``RUN/probe/selection.json``, :func:`supcon.rundir.selected_checkpoint`); ``--init-from RUN/ckpt_epoch_N.pth`` (or
``last.pth``) names one. The checkpoint must hold the same network at the same input size as the
baseline asks for (``--model``, ``--small-input``, ``--size``): a partial load would fine-tune a
network that is partly random without saying so, so a mismatch is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supcon.checkpoint import file_sha256
from supcon.errors import UserError
from supcon.rundir import (
    RunKind,
    kind_from_run_info,
    load_supcon_checkpoint,
    read_config,
    selected_checkpoint,
    split_config,
)

logger = logging.getLogger(__name__)


@dataclass
class InitSource:
    """The SupCon checkpoint a fine-tune starts from, and what the run records of it."""

    path: Path
    run_dir: Path
    backbone_epoch: int
    sha256: str
    how: str  # "selected by probe-all (trend)" or "named"
    encoder: dict[str, Any]
    mean: list[float] | None
    std: list[float] | None

    def describe(self) -> str:
        """For the comparison table's network column: where the fine-tune started."""
        return f"fine-tuned from SupCon {self.run_dir.name} epoch {self.backbone_epoch}"

    def record(self) -> dict[str, Any]:
        return {"checkpoint": str(self.path), "run": str(self.run_dir), "backbone_epoch": self.backbone_epoch,
                "checkpoint_sha256": self.sha256, "chosen": self.how}


def resolve_init_source(init_from: str, model: str, small_input: bool, size: int) -> InitSource:
    """Find, load and check the SupCon checkpoint that ``--init-from`` names.

    Raises:
        UserError: not found; a run that was never probed; not a SupCon run or checkpoint; a model,
            stem or input size that differs from the baseline's (one line, saying what to pass).
    """
    given = Path(init_from).expanduser()
    if given.is_dir():
        run_dir = given
        _, run_info = split_config(read_config(run_dir))
        kind = kind_from_run_info(run_info, run_dir)
        if kind is not RunKind.SUPCON:
            raise UserError(f"--init-from {given}: a {kind} run, not a supcon-train run")
        path, selection = selected_checkpoint(run_dir, f"--init-from {given}")
        how = f"selected by probe-all ({selection.get('rule', '?')})"
    elif given.is_file():
        path, run_dir, how = given, given.parent, "named"
    else:
        raise UserError(f"--init-from not found: {given} (a supcon-train run directory or one of its checkpoints)")
    state = load_supcon_checkpoint(path)
    model_config = state.get("model_config") or {}
    problems = []
    if model_config.get("model") != model:
        problems.append(f"model {model_config.get('model')!r} (pass --model {model_config.get('model')})")
    if bool(model_config.get("small_input")) != bool(small_input):
        flag = "--small-input" if model_config.get("small_input") else "--no-small-input"
        problems.append(f"{'the small-input' if model_config.get('small_input') else 'the standard'} stem "
                        f"(pass {flag})")
    trained_size = (state.get("config") or {}).get("size")
    if trained_size is not None and int(trained_size) != int(size):
        problems.append(f"{trained_size} px images (pass --size {trained_size})")
    if problems:
        raise UserError(f"--init-from {path}: the SupCon encoder was trained as {' and '.join(problems)}; "
                        "the fine-tune must use the same network and input size")
    epoch = int(state.get("epoch", 0))
    logger.info("starting the backbone from %s (backbone epoch %d, %s)", path, epoch, how)
    return InitSource(path, run_dir, epoch, file_sha256(path), how, state["encoder"], state.get("mean"),
                      state.get("std"))
