"""``supcon-train``: a thin click shell over :func:`supcon.train.train`."""

from __future__ import annotations

import click

from supcon.cli_utils import (
    OneLineErrorCommand,
    image_check_options,
    resolve_command_config,
    setup_logging,
    show_progress,
)
from supcon.config import SAMPLERS, TrainConfig

D = TrainConfig()


@click.command(cls=OneLineErrorCommand, context_settings={"help_option_names": ["-h", "--help"],
                                                          "max_content_width": 110})
@click.option("--data-folder", "--data_folder", "data_folder", type=str,
              help="Training ImageFolder (one subfolder of images per class).")
@click.option("--dataset", type=str, default=D.dataset, show_default=True,
              help="Accepted for the reference scripts' command lines; only 'path' (use --data-folder).")
@click.option("--val-folder", "--val_folder", "val_folder", type=str,
              help="Val ImageFolder for the kNN monitor [default: sibling 'val' of the data folder, if any].")
@click.option("--model", type=str, default=D.model, show_default=True,
              help="Any timm model name, e.g. seresnext50_32x4d.")
@click.option("--pretrained/--no-pretrained", default=D.pretrained, show_default=True,
              help="Start the encoder from timm's ImageNet weights (needs network).")
@click.option("--small-input/--no-small-input", "small_input", default=D.small_input, show_default=True,
              help="3x3 stride-1 stem without max-pool, for tiny (e.g. 32 px) images.")
@click.option("--zero-init-last/--no-zero-init-last", "zero_init_last", default=D.zero_init_last, show_default=True,
              help="timm's zero init of each residual block's last BN (collapses SupCon from scratch; see "
                   "docs/concepts/training-health.md).")
@click.option("--feat-dim", "--feat_dim", "feat_dim", type=int, default=D.feat_dim, show_default=True,
              help="Projection output size.")
@click.option("--head-bn/--no-head-bn", "head_bn", default=D.head_bn, show_default=True,
              help="BatchNorm after the projection head's hidden layer (avoids the early collapse; see "
                   "docs/concepts/training-health.md).")
@click.option("--method", type=click.Choice(["supcon", "simclr"], case_sensitive=False), default=D.method,
              show_default=True, help="supcon uses the labels; simclr ignores them.")
@click.option("--temp", type=float, default=D.temp, show_default=True, help="Loss temperature.")
@click.option("--base-temp", type=float, default=D.base_temp, show_default=True,
              help="Base temperature: the loss is scaled by temp / base-temp (the reference keeps both at 0.07).")
@click.option("--size", type=int, default=D.size, show_default=True, help="Crop size (pixels).")
@click.option("--crop-min", type=float, default=D.crop_min, show_default=True,
              help="Smallest random crop, as a fraction of the image area.")
@click.option("--flip/--no-flip", default=D.flip, show_default=True, help="Random horizontal flips.")
@click.option("--mean", type=str, help='Normalisation mean "r,g,b" [default: computed from the data folder].')
@click.option("--std", type=str, help='Normalisation std "r,g,b" [default: computed from the data folder].')
@click.option("--batch-size", "--batch_size", "batch_size", type=int, default=D.batch_size, show_default=True,
              help="Images per process per step (each gives 2 views).")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=D.sampler, show_default=True,
              help="random: batches drawn at the classes' frequencies; balanced: every class an equal share of each "
                   "global batch, the small classes dealt again (with other crops) when they run out; the same "
                   "steps per epoch (see docs/commands/supcon-train.md).")
@click.option("--chunk-size", "chunk_size", type=int,
              help="Images per forward pass (exact gradient caching): the loss still sees the whole --batch-size, "
                   "BatchNorm sees chunk statistics (see docs/guides/large-contrastive-batches.md) "
                   "[default: the whole batch].")
@click.option("--memory-size", type=int, default=D.memory_size, show_default=True,
              help="Cross-batch memory: contrast against the last N projections (views) of earlier steps "
                   "(0: off).")
@click.option("--memory-warmup", type=int, default=D.memory_warmup, show_default=True,
              help="Epochs before the cross-batch memory is contrasted against (it fills from the start).")
@click.option("--epochs", type=int, default=D.epochs, show_default=True)
@click.option("--learning-rate", "--learning_rate", "learning_rate", type=float,
              help="[default: 0.5 x global batch / 1024, e.g. 0.015625 at batch 32]")
@click.option("--momentum", type=float, default=D.momentum, show_default=True)
@click.option("--weight-decay", "--weight_decay", "weight_decay", type=float, default=D.weight_decay, show_default=True)
@click.option("--cosine/--no-cosine", default=D.cosine, show_default=True,
              help="Cosine decay to lr x lr_decay_rate^3; --no-cosine uses step decay at --lr-decay-epochs.")
@click.option("--schedule", type=click.Choice(["cosine", "step", "wsd"]),
              help="LR schedule: cosine (the reference), step (decay at --lr-decay-epochs), wsd (warm-up, constant, "
                   "then a linear cool-down over --cooldown-fraction of the epochs) [default: cosine; step with "
                   "--no-cosine; wsd with --until plateau].")
@click.option("--cooldown-fraction", type=float, default=D.cooldown_fraction, show_default=True,
              help="wsd: the cool-down's share of the epochs (with --until plateau: of the epochs trained when the "
                   "plateau is found).")
@click.option("--until", type=click.Choice(["epochs", "plateau"]), default=D.until, show_default=True,
              help="epochs: train --epochs; plateau: end when the live probe's val accuracy has settled (its "
                   "recent trend promises less than --plateau-tolerance for training as long again; then cool down, "
                   "save and stop), with --epochs as the ceiling.")
@click.option("--plateau-patience", type=float, default=D.plateau_patience, show_default=True,
              help="--until plateau: the share of the epochs so far whose live probes the trend is fitted to.")
@click.option("--plateau-tolerance", type=float, default=D.plateau_tolerance, show_default=True,
              help="--until plateau: cool down when training as long again would add less than this much val "
                   "accuracy at the live probe's recent pace, one standard error included (0.03: three points).")
@click.option("--probe-every", type=int,
              help="Live probe every N epochs: an L-BFGS linear head on the frozen features of the training images, "
                   "scored on the val folder (0: off) [default: --save-freq when there is a val folder].")
@click.option("--probe-max-images", type=int, default=D.probe_max_images, show_default=True,
              help="Live probe: at most this many training images (a seeded subset beyond; recorded).")
@click.option("--lr-decay-epochs", "--lr_decay_epochs", "lr_decay_epochs", type=str,
              default=",".join(map(str, D.lr_decay_epochs)), show_default=True,
              help="Step-decay epochs (with --no-cosine).")
@click.option("--lr-decay-rate", "--lr_decay_rate", "lr_decay_rate", type=float, default=D.lr_decay_rate,
              show_default=True)
@click.option("--warm/--no-warm", default=None,
              help="Linear warm-up over --warm-epochs [default: on above global batch 256].")
@click.option("--warm-epochs", type=int, default=D.warm_epochs, show_default=True, help="Warm-up length (epochs).")
@click.option("--warmup-from", type=float, default=D.warmup_from, show_default=True,
              help="Learning rate at the first warm-up step.")
@click.option("--save-freq", "--save_freq", "save_freq", type=int, default=D.save_freq, show_default=True,
              help="Keep a checkpoint every N epochs (and at the last).")
@click.option("--num-workers", "--num_workers", "num_workers", type=int, default=D.num_workers, show_default=True,
              help="Data-loading processes.")
@click.option("--seed", type=int, default=D.seed, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="[default: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU]")
@click.option("--channels-last/--no-channels-last", "channels_last", default=None,
              help="NHWC memory format [default: on with a GPU].")
@click.option("--gpu-augment/--no-gpu-augment", "gpu_augment", default=None,
              help="Fast data path: workers only decode and crop (uint8); flip, colour jitter, grayscale and "
                   "normalisation run batched on the training device (GPU, or the CPU) [default: on with a GPU].")
@click.option("--compile/--no-compile", "compile", default=D.compile, show_default=True,
              help="torch.compile the model.")
@click.option("--grad-checkpointing/--no-grad-checkpointing", "grad_checkpointing", default=D.grad_checkpointing,
              show_default=True, help="Recompute encoder activations in backward: less GPU memory, ~1/3 more compute.")
@click.option("--sync-bn/--no-sync-bn", "sync_bn", default=D.sync_bn, show_default=True,
              help="SyncBatchNorm across processes (multi-GPU).")
@click.option("--run-dir", "--run_dir", "run_dir", type=str,
              help="[default: runs/<model>_bs<batch>_<timestamp>]")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last.pth (starts it if new).")
@image_check_options
@click.option("--keep-last", type=int, default=D.keep_last, show_default=True,
              help="Keep only the newest N ckpt_epoch_<N>.pth files (older ones are deleted once a newer one is "
                   "written; 0 keeps all). last.pth is always kept.")
@click.option("--knn-every", type=int, default=D.knn_every, show_default=True,
              help="Run the kNN monitor every N epochs (0: off).")
@click.option("--knn-k", type=int, default=D.knn_k, show_default=True, help="Neighbours of the kNN monitor.")
@click.option("--knn-temperature", type=float, default=D.knn_temperature, show_default=True,
              help="Temperature of the kNN monitor's similarity weights.")
@click.option("--collapse-patience", type=int, default=D.collapse_patience, show_default=True,
              help="Epochs at the collapsed loss before warning.")
@click.option("--stop-on-collapse", is_flag=True, help="End the run (exit 3) when the collapse warning fires.")
@click.option("--dist-timeout", type=float, default=D.dist_timeout, show_default=True, metavar="SECONDS",
              help="Several processes: how long a collective may wait for the others; then the run ends, naming a "
                   "process that stopped answering (may differ on --resume).")
@click.option("--log-every", type=int, default=D.log_every, show_default=True,
              help="Steps between progress updates (and device syncs).")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML file of options; the command line wins.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def train_command(ctx: click.Context, config: str | None, quiet: bool, **_):
    """Pretrain an encoder with the supervised contrastive (SupCon) loss on an image folder."""
    from supcon.distributed import is_main_process
    from supcon.train import train

    setup_logging()
    train_config = resolve_command_config(ctx, TrainConfig, config, section="train", skip=("config", "quiet"))
    result = train(train_config, progress=show_progress(quiet))
    if is_main_process():
        click.echo(f"run directory: {result.run_dir}")
    return result.exit_code


main = train_command

if __name__ == "__main__":  # pragma: no cover - `python -m supcon.cli` (used under torchrun)
    main()
