"""``baseline-train``: a thin click shell over :func:`supcon.baseline.train.train` and the grid."""

from __future__ import annotations

import click

from supcon.baseline.config import (
    AUGMENTATIONS,
    CLASS_WEIGHTS,
    CLASSICAL_MODELS,
    HEADS,
    LOSSES,
    MONITORS,
    SCHEDULERS,
    BaselineConfig,
)
from supcon.cli_utils import (
    OneLineErrorCommand,
    image_check_options,
    resolve_command_config,
    setup_logging,
    show_progress,
)
from supcon.config import SAMPLERS

D = BaselineConfig()


@click.command(cls=OneLineErrorCommand, context_settings={"help_option_names": ["-h", "--help"],
                                                          "max_content_width": 110})
@click.option("--data-folder", "--data_folder", "data_folder", type=str,
              help="Training ImageFolder (one subfolder of images per class).")
@click.option("--val-folder", "--val_folder", "val_folder", type=str,
              help="Validation ImageFolder [default: sibling 'val' of the data folder, else --val-split].")
@click.option("--test-folder", "--test_folder", "test_folder", type=str,
              help="Test ImageFolder, recorded for check-accuracies and used by the grid [default: sibling 'test'].")
@click.option("--val-split", "--val_split", "val_split", type=float, default=D.val_split, show_default=True,
              help="Without a val folder: fraction of each class held out for validation.")
@click.option("--split-seed", type=int, default=D.split_seed, show_default=True,
              help="Seed of the --val-split (kept apart from --seed so every seed of a grid sees the same split).")
@click.option("--model", type=str, default=D.model, show_default=True,
              help="Any timm model name; torchvision alexnet, squeezenet1_0, googlenet; a custom net: "
                   "simple_cnn, plain_cnn, se_net, inception_net; or a classical classifier (scikit-learn, "
                   "hyper-parameters chosen on val): svm (RBF), logreg, knn.")
@click.option("--features", type=str, default=D.features, show_default=True,
              help="svm/logreg/knn: 'pixels' (at a small --size, e.g. 8), 'timm:MODEL' (a frozen timm backbone; "
                   "weights from --pretrained-file or --pretrained) or 'run:RUN' (a SupCon run's encoder).")
@click.option("--pretrained/--no-pretrained", default=D.pretrained, show_default=True,
              help="Start from ImageNet weights via timm/torchvision (needs network).")
@click.option("--pretrained-file", type=str,
              help="Start the backbone from a local weights file (state dict, supcon-train or baseline checkpoint).")
@click.option("--init-from", type=str,
              help="Fine-tune from a SupCon encoder: a supcon-train run (the checkpoint probe-all selected) or one "
                   "of its checkpoints (RUN/ckpt_epoch_N.pth); --model, --small-input and --size must match it.")
@click.option("--small-input/--no-small-input", "small_input", default=D.small_input, show_default=True,
              help="timm models: 3x3 stride-1 stem without max-pool, for tiny (e.g. 32 px) images.")
@click.option("--head", type=click.Choice(HEADS), help="Classifier head [default: linear; a custom net's own head].")
@click.option("--head-hidden", type=int, help="Hidden width of the mlp heads [default: 512; custom nets 256].")
@click.option("--freeze", type=int, default=D.freeze, show_default=True,
              help="Freeze the first N blocks, the stem with block 1 (timm: its fine parameter groups, e.g. residual "
                   "or MBConv blocks; alexnet: layers; squeezenet: Fire; googlenet: Inception modules); BatchNorm "
                   "statistics still update.")
@click.option("--loss", type=click.Choice(LOSSES), default=D.loss, show_default=True,
              help="ce: cross-entropy; bce: one logit with binary cross-entropy (2 classes).")
@click.option("--class-weights", type=click.Choice(CLASS_WEIGHTS), default=D.class_weights, show_default=True,
              help="Weights of the classes in the training loss: none, or balanced (n_images / (n_classes x "
                   "n_images_of_the_class), scikit-learn's); the validation loss stays unweighted.")
@click.option("--aux-weight", type=float, default=D.aux_weight, show_default=True,
              help="Weight of each auxiliary classifier's loss (googlenet, inception_net).")
@click.option("--optimizer", type=str, default=D.optimizer, show_default=True,
              help="sgd, adam or adamw; several (sgd,adam) make a grid.")
@click.option("--learning-rate", "--learning_rate", "learning_rate", type=str, default=str(D.learning_rate),
              show_default=True, help="Several (1e-5,1e-4,1e-3) make a grid.")
@click.option("--momentum", type=str, default=str(D.momentum), show_default=True,
              help="SGD momentum; several make a grid.")
@click.option("--betas", type=str, default="0.9,0.999", show_default=True, help="Adam/AdamW betas.")
@click.option("--weight-decay", "--weight_decay", "weight_decay", type=float, default=D.weight_decay,
              show_default=True)
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default=D.scheduler, show_default=True,
              help="Per-epoch LR schedule.")
@click.option("--lr-step-epochs", type=int, default=D.lr_step_epochs, show_default=True,
              help="step: multiply the LR by --lr-gamma every N epochs.")
@click.option("--lr-gamma", type=float, default=D.lr_gamma, show_default=True,
              help="step/plateau: LR decay factor.")
@click.option("--plateau-patience", type=int, default=D.plateau_patience, show_default=True,
              help="plateau: epochs without improvement before decaying the LR.")
@click.option("--epochs", type=int, default=D.epochs, show_default=True)
@click.option("--patience", type=int, default=D.patience, show_default=True,
              help="Early stopping: stop after N epochs without improvement of --monitor (0: off).")
@click.option("--monitor", type=click.Choice(MONITORS), default=D.monitor, show_default=True,
              help="Validation value that picks best.pth and drives early stopping / plateau.")
@click.option("--augment", type=click.Choice(AUGMENTATIONS), default=D.augment, show_default=True,
              help="none; flip; standard = crop 0.8-1, flip, rotation, colour jitter, random erasing; supcon = "
                   "supcon-train's augmentation (crop 0.2-1, strong colour jitter, grey-scale), one view.")
@click.option("--size", type=int, default=D.size, show_default=True, help="Input size (pixels).")
@click.option("--mean", type=str, help='Normalisation mean "r,g,b" [default: computed from the training images].')
@click.option("--std", type=str, help='Normalisation std "r,g,b" [default: computed from the training images].')
@click.option("--batch-size", "--batch_size", "batch_size", type=int, default=D.batch_size, show_default=True)
@click.option("--sampler", type=click.Choice(SAMPLERS), default=D.sampler, show_default=True,
              help="random: batches drawn at the classes' frequencies; balanced: every class an equal share of each "
                   "global batch, the small classes dealt again (with other crops) when they run out; the same "
                   "steps per epoch.")
@click.option("--num-workers", "--num_workers", "num_workers", type=int, default=D.num_workers, show_default=True,
              help="Data-loading processes.")
@click.option("--seed", type=int, default=D.seed, show_default=True)
@click.option("--seeds", type=str, help="A grid over seeds: a count (3: seed, seed+1, seed+2) or a list (0,5,7).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="[default: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU]")
@click.option("--run-dir", "--run_dir", "run_dir", type=str,
              help="[default: runs/<model>_baseline_bs<batch>_<timestamp> (a grid: <model>_baseline_grid_...)]")
@click.option("--resume", is_flag=True, help="Continue the run (or grid) in --run-dir (starts it if new).")
@image_check_options
@click.option("--config", type=click.Path(dir_okay=False),
              help="YAML file of options (or a 'baseline:' section); the command line wins.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def baseline_command(ctx: click.Context, config: str | None, quiet: bool, **_):
    """Train a supervised baseline classifier on an image folder, or a grid of them; or fit a classical one
    (svm, logreg, knn) on pixels or frozen features."""
    from supcon.baseline.config import is_grid
    from supcon.distributed import is_main_process

    setup_logging()
    baseline_config = resolve_command_config(ctx, BaselineConfig, config, section="baseline",
                                             skip=("config", "quiet"))
    main_process = is_main_process()  # under torchrun / accelerate launch, print once
    if baseline_config.model in CLASSICAL_MODELS:
        from supcon.baseline.classical import fit_classical

        fitted = fit_classical(baseline_config, progress=show_progress(quiet))
        click.echo(f"{fitted.description}: val accuracy {100 * fitted.val_accuracy:.2f}%")
        click.echo(f"run directory: {fitted.run_dir}")
        return 0
    if is_grid(baseline_config):
        from supcon.baseline.grid import run_grid, summary_markdown

        grid = run_grid(baseline_config, progress=show_progress(quiet))
        if main_process:
            if grid.summary:
                click.echo(summary_markdown(grid.summary), nl=False)
            click.echo(f"grid directory: {grid.grid_dir} ({len(grid.rows)} of {grid.cells_total} runs done)")
        return grid.exit_code
    from supcon.baseline.train import train

    result = train(baseline_config, progress=show_progress(quiet))
    if main_process:
        click.echo(f"run directory: {result.run_dir}")
    return result.exit_code


main = baseline_command

if __name__ == "__main__":  # pragma: no cover - `python -m supcon.baseline.cli` (used under torchrun)
    main()
