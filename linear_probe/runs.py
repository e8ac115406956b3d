"""What a run directory tells the later stages: kind, class names, folders; and the folder checks.

The run directory is the contract (see ``supcon.rundir``): the train folder, class names, model
config and image size are read from its ``config.yaml``, so probing never re-asks for them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supcon.data import ImageFolderIndex, scan_image_folder
from supcon.errors import UserError
from supcon.rundir import (
    CACHE_DIR,
    CONFIG_FILE,
    PROBE_DIR,
    RUN_INFO_KEY,
    RunKind,
    find_runs,
    find_split_folder,
    kind_from_run_info,
    read_config,
    run_kind,
    split_config,
)

__all__ = ["PROBE_DIR", "RunInfo", "RunKind", "latest_supcon_run", "resolve_folder", "run_kind", "scan_checked"]


@dataclass
class RunInfo:
    """The parts of a run's ``config.yaml`` that probing and testing need."""

    run_dir: Path
    kind: RunKind
    config: dict[str, Any]
    run_info: dict[str, Any]

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunInfo:
        """Raises: UserError when ``run_dir`` is not a run directory, or records a kind this version does not know."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise UserError(f"run directory not found: {run_dir}")
        config, run_info = split_config(read_config(run_dir))
        if not isinstance(run_info, dict):
            raise UserError(f"{run_dir / CONFIG_FILE} has a malformed '{RUN_INFO_KEY}' entry")
        return cls(run_dir, kind_from_run_info(run_info, run_dir), config, run_info)

    @property
    def class_names(self) -> list[str]:
        return list(self.run_info.get("class_names") or [])

    @property
    def model_config(self) -> dict[str, Any]:
        return dict(self.run_info.get("model_config") or {})

    @property
    def train_folder(self) -> str | None:
        return self.run_info.get("data_folder") or self.config.get("data_folder")

    @property
    def allows_split_names(self) -> bool:
        """The run was trained with ``--allow-split-class-names`` (its classes are named like splits)."""
        return bool(self.config.get("allow_split_class_names"))

    @property
    def size(self) -> int:
        return int(self.config.get("size", 224))

    @property
    def global_batch(self) -> int | None:
        value = self.run_info.get("global_batch", self.config.get("batch_size"))
        return int(value) if value is not None else None

    @property
    def steps_per_epoch(self) -> int | None:
        value = self.run_info.get("steps_per_epoch")
        return int(value) if value else None

    @property
    def probe_dir(self) -> Path:
        return self.run_dir / PROBE_DIR

    @property
    def cache_dir(self) -> Path:
        """Default home of the feature cache."""
        return self.probe_dir / CACHE_DIR

    def require_supcon(self, command: str) -> None:
        if self.kind is not RunKind.SUPCON:
            raise UserError(
                f"{self.run_dir} is a '{self.kind}' run; {command} works on SupCon runs "
                "(baseline runs go straight to check-accuracies)"
            )


def latest_supcon_run(root: str | os.PathLike) -> Path:
    """The most recent SupCon run under ``root`` (by config.yaml modification time).

    Raises:
        UserError: no SupCon run there.
    """
    runs = [r for r in find_runs(root) if run_kind(r) is RunKind.SUPCON]
    if not runs:
        raise UserError(
            f"no run found under {Path(root).resolve()} (train one with supcon-train, or pass --run DIR)"
        )
    return runs[-1]


def resolve_folder(explicit: str | None, train_folder: str | None, sibling: str, option: str,
                   recorded: str | None = None) -> str:
    """The val/test folder in :func:`supcon.rundir.find_split_folder`'s order: ``explicit``, else
    ``recorded`` (if it still exists), else a sibling ``sibling`` of the train folder.

    Raises:
        UserError: none of them exists (names the option to pass).
    """
    found = find_split_folder(sibling, explicit, train_folder, recorded)
    if found is not None:
        return found
    where = (f"{Path(train_folder).parent / sibling} does not exist" if train_folder
             else "the run records no train folder")
    raise UserError(f"no {sibling} folder: {where}; pass {option} DIR")


def scan_checked(folder: str, what: str, class_names: list[str], allow_split_names: bool = False) -> ImageFolderIndex:
    """Scan an ImageFolder and check its class names against the run's.

    Raises:
        UserError: missing/empty folder, class folders named like dataset splits (unless
            ``allow_split_names``), or class names that differ from ``class_names``.
    """
    index = scan_image_folder(folder, what, allow_split_names=allow_split_names)
    if class_names and index.classes != class_names:
        raise UserError(
            f"class names differ between the run's training folder {class_names} and the {what} {folder} "
            f"{index.classes}"
        )
    return index
