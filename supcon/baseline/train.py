"""``baseline-train``'s library entry: ``train`` trains (or resumes) one supervised baseline as configured.

The run directory follows the contract of :mod:`supcon.rundir`; the lifecycle is
:class:`supcon.engine.RunEngine`'s, and :class:`supcon.baseline.trainer.BaselineTrainer` supplies the
classifier step, validation, early stopping and ``best.pth``::

    RUN/config.yaml     every resolved option + run_info (kind: baseline, classes, folders, mean/std, ...)
    RUN/best.pth        the best-by-validation weights (model_config, class names, mean/std, best epoch)
    RUN/last.pth        the newest state, for --resume (optimizer, scheduler, RNG, early stopping)
    RUN/metrics.csv     one row per epoch: train loss/accuracy, val loss/accuracy/AUC/F1, lr, time
    RUN/tensorboard/    TensorBoard events

``last.pth`` is written after every epoch. SIGTERM/Ctrl-C stops within a step and leaves the
previous ``last.pth``; ``--resume`` redoes the interrupted epoch exactly (data order, crops and
RNG states are functions of the seed and epoch), so a resumed run ends with the weights of an
uninterrupted one on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from supcon.baseline.config import RUNTIME_KEYS, BaselineConfig
from supcon.baseline.data import PreparedData, prepare_data
from supcon.baseline.init_from import resolve_init_source
from supcon.baseline.models import make_model_config
from supcon.baseline.trainer import METRIC_FIELDS, TENSORBOARD_TAGS, BaselineTrainer
from supcon.config import to_yaml_dict
from supcon.engine import RunEngine
from supcon.errors import UserError
from supcon.interrupt import exit_code
from supcon.processes import default_precision
from supcon.resume import RecordedRun
from supcon.rundir import BEST, image_listing, load_baseline_checkpoint
from supcon.sampling import check_balanced_classes

logger = logging.getLogger(__name__)


@dataclass
class BaselineResult:
    run_dir: Path
    epochs_done: int
    best_epoch: int = 0
    best_val_accuracy: float | None = None
    best_val_loss: float | None = None
    stopped_early: bool = False
    interrupted_by: int | None = None  # signal number
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return exit_code(self.interrupted_by)


def _result_from_state(run_dir: Path, state: dict[str, Any]) -> BaselineResult:
    return BaselineResult(run_dir=run_dir, epochs_done=int(state["epoch"]), best_epoch=int(state["best_epoch"]),
                          best_val_accuracy=state.get("best_val_accuracy"), best_val_loss=state.get("best_val_loss"),
                          stopped_early=bool(state.get("stopped_early")))


def _start(config: BaselineConfig, progress: bool) -> tuple[BaselineConfig, RunEngine, RecordedRun | None]:
    """Validate, open the run directory and refuse or resume; returns the config with its precision."""
    config = replace(config)
    config.validate()
    config = replace(config, precision=config.precision or default_precision())
    engine = RunEngine(config.precision, progress)
    try:
        engine.choose_run_dir(config.run_dir, config.resume, f"{config.model}_baseline", config.batch_size)
        resume = engine.resume_wanted(config.resume)
        recorded = engine.open_existing(resume)
        config = replace(config, resume=resume, batch_size=engine.per_process_batch(recorded, config.batch_size))
        global_batch = config.batch_size * engine.world
        engine.refuse_changes(recorded, to_yaml_dict(config), RUNTIME_KEYS, global_batch, config.batch_size,
                              defaults=to_yaml_dict(BaselineConfig()))
    except BaseException:
        engine.close()
        raise
    if recorded is not None and config.mean is None:
        config = replace(config, mean=recorded.options.get("mean"), std=recorded.options.get("std"))
    return config, engine, recorded


def train(config: BaselineConfig, progress: bool = True, data: PreparedData | None = None) -> BaselineResult:
    """Train (or resume) one supervised baseline as configured; returns where and how it ended.

    ``data``: the folders already checked by :func:`prepare_data` for this config's folders (the grid
    checks them once for all its runs).

    Raises:
        UserError: bad input (paths, images, options, model) or a conflicting run directory, before
            anything is written; a non-finite loss during training.
    """
    config, engine, recorded = _start(config, progress)
    try:
        with engine.failures_as_messages():
            return _train(engine, config, recorded, progress, data)
    finally:
        engine.close()


def _train(engine: RunEngine, config: BaselineConfig, recorded: RecordedRun | None, progress: bool,
           data: PreparedData | None) -> BaselineResult:
    resume_state = engine.last_state(load_baseline_checkpoint, recorded)
    run_dir = engine.run_dir
    if resume_state is not None and resume_state.get("finished"):
        logger.info("run %s is finished (%d epochs, best epoch %d): nothing to train; check-accuracies tests its "
                    "%s. To train longer, start a new run", run_dir, resume_state["epoch"],
                    resume_state["best_epoch"], BEST)
        return _result_from_state(run_dir, resume_state)
    make_model_config(config.model, 2, "ce", config.head, config.head_hidden, config.small_input)  # name, head
    if config.pretrained_file and resume_state is None and not Path(config.pretrained_file).is_file():
        raise UserError(f"--pretrained-file not found: {config.pretrained_file}")
    init = None
    if config.init_from and resume_state is None:
        init = resolve_init_source(config.init_from, config.model, config.small_input, config.size)
        if config.mean is None and init.mean is not None:  # the inputs the encoder was trained on
            config = replace(config, mean=list(init.mean), std=list(init.std))
    data = data or prepare_data(config, engine)
    if config.mean is None:
        config = replace(config, mean=data.mean, std=data.std)
    if config.loss == "bce" and len(data.classes) != 2:
        raise UserError(f"--loss bce (one logit) needs exactly 2 classes, the data folder has {len(data.classes)}; "
                        "use ce")
    if len(data.train_samples) < config.batch_size * engine.world:
        raise UserError(f"the training part has {len(data.train_samples)} images, fewer than one batch of "
                        f"{config.batch_size * engine.world}; lower --batch-size")
    if config.sampler == "balanced":
        repeats = check_balanced_classes(data.classes, [label for _, label in data.train_samples],
                                         config.batch_size * engine.world, where="training part")
        if repeats and engine.is_main:
            logger.warning("%s", repeats)
    model_config = make_model_config(config.model, len(data.classes), config.loss, config.head, config.head_hidden,
                                     config.small_input)
    config = replace(config, head=model_config["head"], head_hidden=model_config["head_hidden"])
    engine.check_data(image_listing(data.train_samples, data.data_folder), recorded, config.allow_data_change,
                      int(resume_state["epoch"]) if resume_state is not None else 0)
    trainer = BaselineTrainer(engine, config, data, model_config, fresh=resume_state is None, init=init,
                              init_record=recorded.run_info.get("init_from") if recorded is not None else None)
    start_epoch = trainer.load(resume_state) if resume_state is not None else 0
    if start_epoch:
        logger.info("resuming %s at epoch %d (%d of %d epochs done)", run_dir, start_epoch + 1, start_epoch,
                    config.epochs)
    # last.pth and best.pth are overwritten in place: at most one more of each while it is written
    engine.check_disk_space(trainer.checkpoint(start_epoch, **trainer.resume_state_at(start_epoch)), trainer.optimizer,
                            1)
    engine.open_sinks(trainer.options, {**trainer.run_info(), **engine.session_facts(recorded, start_epoch)},
                      METRIC_FIELDS, TENSORBOARD_TAGS, start_epoch)
    trainer.make_loaders()
    outcome = engine.run_epochs(trainer, start_epoch, config.epochs, steps_per_epoch=trainer.steps_per_epoch)
    best = trainer.best_metrics
    result = BaselineResult(run_dir=run_dir, epochs_done=outcome.epochs_done, best_epoch=trainer.stopper.best_epoch,
                            best_val_accuracy=best.get("accuracy"), best_val_loss=best.get("loss"),
                            stopped_early=outcome.end_reason is not None, interrupted_by=outcome.interrupted_by,
                            history=outcome.history)
    if outcome.end_reason:
        logger.info("%s", outcome.end_reason)
    if result.best_epoch and result.interrupted_by is None:
        logger.info("best epoch %d: val accuracy %.4f, val loss %.4f; weights in %s", result.best_epoch,
                    result.best_val_accuracy, result.best_val_loss, run_dir / BEST)
    return result

