"""Benchmark SupCon training throughput: the plain path against the fast paths, in one process.

For each model and batch size it measures the plain path (fp32, NCHW, no compile, cuDNN autotune
off, torchvision augmentation in the loader workers) and then each fast configuration (the product
of the --precision, --memory-format, --compile, --data-path and --grad-checkpointing lists), through
supcon.epoch.train_one_epoch itself, and reports source images/s (each image gives two views) and
the ratio to the plain path, plus peak GPU memory.

Two data sources:

* synthetic: batches already on the device (float views for the plain path, uint8 crops for the
  device-augmentation path, whose flip/jitter/grayscale/normalise is then timed as part of the step):
  what the device can do, loading excluded;
* folder: a real JPEG ImageFolder (--data-folder, or generated 250x250 JPEGs) through the real
  loader (--num-workers, pinned memory on a GPU): compute plus loading.

Warm-up steps (cuDNN autotuning, torch.compile) run on synthetic batches first and are excluded;
each figure is the median of all timed windows (--repeats per measurement, --rounds measurements
per setting in alternating order; all windows are in the JSON).
The folder timing starts once the workers' first round of batches has been consumed, so the
loader's prefetch buffer cannot flatter a loader-bound run.

    .venv/bin/python scripts/bench_train.py                                  # defaults for this device
    .venv/bin/python scripts/bench_train.py --model resnet50,seresnext50_32x4d --batch-size 32,64 \\
        --compile off,on --num-workers 16                                    # on a GPU
    .venv/bin/python scripts/bench_train.py --model resnet50 --batch-size 64,1024 --chunk-size 0,64,128 \\
        --data synthetic --no-plain             # gradient caching: contrastive batch 1024 in chunks, on a GPU

Writes benchmarks/train_<device>_<date>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bench  # noqa: E402
import torch  # noqa: E402

from supcon.data import make_loader  # noqa: E402
from supcon.gpu_augment import AugmentSpec, DeviceAugment  # noqa: E402
from supcon.losses import SupConLoss  # noqa: E402
from supcon.models import build_model  # noqa: E402
from supcon.schedule import LRSchedule  # noqa: E402

try:
    from supcon.epoch import train_one_epoch
    from supcon.processes import default_precision, make_accelerator
except ImportError:  # a checkout from before the split of issue 23: supcon.train and supcon.engine held them
    from supcon.engine import default_precision, make_accelerator
    from supcon.train import train_one_epoch

logger = logging.getLogger("bench_train")
N_VIEWS = 2


@dataclass(frozen=True)
class Setting:
    """One training configuration."""

    name: str
    precision: str
    memory_format: str  # nchw | nhwc
    compile: bool
    data_path: str  # cpu (torchvision in the workers) | device (uint8 crops, colour ops on the device)
    grad_checkpointing: bool
    cudnn_benchmark: bool
    loop: str = "project"  # project (supcon.epoch.train_one_epoch) | reference (reference_step below)
    chunk_size: int = 0  # images per forward pass (gradient caching); 0: the whole batch

    @property
    def channels_last(self) -> bool:
        return self.memory_format == "nhwc"


PLAIN = Setting("plain", "fp32", "nchw", False, "cpu", False, False)


def reference_settings(fast: list[Setting], on_gpu: bool) -> list[Setting]:
    """The 40-line reference loop at each (precision, memory format) of the eager fast settings."""
    pairs = dict.fromkeys((s.precision, s.memory_format) for s in fast if not s.compile) or {
        (default_precision(), "nhwc" if on_gpu else "nchw"): None}
    return [Setting(f"reference {precision}/{memory_format}", precision, memory_format, False, "float", False,
                    cudnn_benchmark=on_gpu, loop="reference") for precision, memory_format in pairs]


# --- The reference: the training step a user would write by hand (about 40 lines), independent of
# --- supcon.epoch / supcon.losses / supcon.models, timed in the same process as the project's paths.

def reference_supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07,
                          base_temperature: float = 0.07) -> torch.Tensor:
    """SupCon L_out as the reference implementation (SupContrast ``losses.py``) writes it; features [B, V, D]."""
    batch, n_views = features.shape[:2]
    mask = torch.eq(labels.view(-1, 1), labels.view(1, -1)).float().repeat(n_views, n_views)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = 1.0 - torch.eye(batch * n_views, device=features.device)
    mask = mask * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


def reference_model(model_name: str, small_input: bool, feat_dim: int = 128) -> torch.nn.Module:
    """timm encoder + MLP head (Linear, BatchNorm, ReLU, Linear) + L2 normalisation."""
    import timm
    import torch.nn.functional as F
    from torch import nn

    encoder = timm.create_model(model_name, num_classes=0)
    if small_input:  # same stem as the project's, so both compute the same network
        from supcon.models import adapt_small_input

        adapt_small_input(encoder, model_name)
    dim = encoder.num_features
    head = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, feat_dim))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = encoder, head

        def forward(self, x):
            return F.normalize(self.head(self.encoder(x)), dim=1)

    return Net()


def reference_run(setting: Setting, model_name: str, batch: int, args, device: torch.device):
    """Build the reference loop for ``setting``; returns ``run(steps) -> (seconds, mean loss)``."""
    torch.backends.cudnn.benchmark = setting.cudnn_benchmark
    torch.manual_seed(0)
    model = reference_model(model_name, args.small_input).to(device)
    views = torch.randn(batch * N_VIEWS, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    if setting.channels_last:
        model, views = model.to(memory_format=torch.channels_last), views.to(memory_format=torch.channels_last)
    views, labels = views.to(device), torch.randint(0, 10, (batch,)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setting.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=setting.precision == "fp16")
    model.train()

    def run(steps: int) -> tuple[float, float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start, total = time.perf_counter(), time.thread_time(), torch.zeros((), device=device)
        for _ in range(steps):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                projection = model(views).float()
                loss = reference_supcon_loss(projection.view(N_VIEWS, batch, -1).transpose(0, 1), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.detach()
        mean_loss = total.item() / max(steps, 1)  # synchronises
        return time.perf_counter() - start, mean_loss, time.thread_time() - cpu_start

    return run


def fast_settings(args, on_gpu: bool) -> list[Setting]:
    """The product of the fast-path option lists, less duplicates and the plain setting itself."""
    settings = []
    for precision, memory_format, compile_, data_path, checkpointing, chunk_size in itertools.product(
            args.precision, args.memory_format, args.compile, args.data_path, args.grad_checkpointing,
            args.chunk_size):
        precision = default_precision() if precision == "auto" else precision
        memory_format = ("nhwc" if on_gpu else "nchw") if memory_format == "auto" else memory_format
        compiled, checkpointed = compile_ == "on", checkpointing == "on"
        if compiled and checkpointed:
            continue  # supcon-train refuses the combination
        parts = [precision, memory_format, "compile" if compiled else "eager",
                 "device-aug" if data_path == "device" else "cpu-aug"] + (["ckpt"] if checkpointed else []) + \
            ([f"chunk{chunk_size}"] if chunk_size else [])
        setting = Setting("fast " + "/".join(parts), precision, memory_format, compiled, data_path, checkpointed,
                          cudnn_benchmark=on_gpu, chunk_size=chunk_size)
        if replace(setting, name=PLAIN.name) != PLAIN and setting not in settings:
            settings.append(setting)
    return settings


def project_optimizer(params, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer supcon-train builds (SGD, fused where this torch has the kernel)."""
    try:
        from supcon.optim import build_optimizer
    except ImportError:  # a checkout from before build_optimizer: plain SGD, as supcon-train built it then
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    return build_optimizer(params, lr=0.05, momentum=0.9, weight_decay=1e-4, device=device)


def _reset_accelerate() -> None:
    """Let the next Accelerator take another mixed precision (accelerate keeps a process-wide state)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class _Repeat:
    """The same device batch ``steps`` times: a loader for compute-only timing."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, steps: int):
        self.images, self.labels, self.steps = images, labels, steps

    def __iter__(self):
        return iter([(self.images, self.labels)] * self.steps)


def synthetic_batch(setting: Setting, batch: int, size: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)
    if setting.data_path == "device":
        images = torch.randint(0, 256, (batch, N_VIEWS, size, size, 3), dtype=torch.uint8, generator=generator)
    else:
        images = torch.randn(batch, N_VIEWS, 3, size, size, generator=generator)
    return images.to(device), labels


def measure(setting: Setting, model_name: str, batch: int, args, samples) -> list[dict]:
    """Time one setting: synthetic and/or folder data; returns one result row per data source."""
    if setting.loop == "reference":
        return measure_reference(setting, model_name, batch, args)
    _reset_accelerate()
    accelerator = make_accelerator(setting.precision)
    device = accelerator.device
    on_gpu = device.type == "cuda"
    torch.backends.cudnn.benchmark = setting.cudnn_benchmark
    torch.manual_seed(0)
    model = build_model(model_name, small_input=args.small_input)
    if setting.grad_checkpointing:
        from supcon.grad_checkpointing import enable_grad_checkpointing

        enable_grad_checkpointing(model)
    if setting.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = project_optimizer(model.parameters(), device)
    if setting.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = LRSchedule(0.05, epochs=1000, steps_per_epoch=10**6)
    loss_fn = SupConLoss()
    spec = AugmentSpec.supcon(args.size, bench.MEAN, bench.STD)
    augment = (DeviceAugment(spec, device, seed=0, channels_last=setting.channels_last)
               if setting.data_path == "device" else None)

    def run(loader) -> tuple[float, float, float]:
        if on_gpu:
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.thread_time()
        state = train_one_epoch(model, loss_fn, loader, optimizer, schedule, accelerator, epoch=0, augment=augment,
                                channels_last=setting.channels_last,
                                chunk_size=setting.chunk_size or None)  # ends with a read of the device: synchronised
        return time.perf_counter() - start, state.loss_sum / max(state.steps_done, 1), time.thread_time() - cpu_start

    def summary(timings: list[tuple[float, float, float]], batch: int) -> dict:
        return window_summary(timings, args.steps, batch, on_gpu)

    def memory() -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 3) if on_gpu else None

    rows = []
    base = {"model": model_name, "batch_size": batch, "size": args.size, "setting": setting.name, **asdict(setting)}
    images, labels = synthetic_batch(setting, batch, args.size, device)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    warm_seconds = run(_Repeat(images, labels, args.warmup))[0]
    peak_with_warmup = memory()
    if "synthetic" in args.data:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        timings = [run(_Repeat(images, labels, args.steps)) for _ in range(args.repeats)]
        rows.append({**base, "data": "synthetic", **summary(timings, batch), "warmup_seconds": round(warm_seconds, 2),
                     "peak_memory_gb": memory(), "peak_memory_with_warmup_gb": peak_with_warmup})
    del images, labels
    if "folder" in args.data:
        dataset = bench.two_view_dataset(samples, args.size, fast=setting.data_path == "device", n_views=N_VIEWS)
        skip = max(args.num_workers, 1) + 2  # the workers' simultaneous first batches
        sampler = bench.EndlessBatches(len(samples), batch, skip + args.repeats * args.steps)
        loader = make_loader(dataset, args.num_workers, on_gpu, batch_sampler=sampler)
        batches = iter(loader)
        run(itertools.islice(batches, skip))
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        timings = [run(itertools.islice(batches, args.steps)) for _ in range(args.repeats)]
        del batches, loader
        rows.append({**base, "data": "folder", "num_workers": args.num_workers, **summary(timings, batch),
                     "peak_memory_gb": memory()})
    return rows


def window_summary(timings: list[tuple[float, float, float]], steps: int, batch: int, on_gpu: bool) -> dict:
    """Figures of the timed windows ``(wall seconds, mean loss, CPU seconds of this thread)``.

    On the CPU, ``cpu_images_per_s`` (images per second of this thread's CPU time) is also kept: on a
    machine shared with other jobs, wall time varies by 2x between windows, CPU time much less. On a
    GPU the host thread's time includes waiting for the device, so it is left out.
    """
    rates = sorted(steps * batch / seconds for seconds, _, _ in timings)
    summary = {"steps": steps, "repeats": len(timings), "images_per_s": round(statistics.median(rates), 2),
               "images_per_s_runs": [round(r, 2) for r in rates],
               "seconds": [round(seconds, 4) for seconds, _, _ in timings], "mean_loss": round(timings[-1][1], 4)}
    if not on_gpu:
        cpu_rates = sorted(steps * batch / max(cpu, 1e-9) for _, _, cpu in timings)
        summary.update(cpu_images_per_s=round(statistics.median(cpu_rates), 2),
                       cpu_images_per_s_runs=[round(r, 2) for r in cpu_rates])
    return summary


def measure_reference(setting: Setting, model_name: str, batch: int, args) -> list[dict]:
    """Time the reference loop (synthetic float views only: it has no loader)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    run = reference_run(setting, model_name, batch, args, device)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    warm_seconds = run(args.warmup)[0]
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    timings = [run(args.steps) for _ in range(args.repeats)]
    return [{"model": model_name, "batch_size": batch, "size": args.size, "setting": setting.name,
             **asdict(setting), "data": "synthetic", **window_summary(timings, args.steps, batch, on_gpu),
             "warmup_seconds": round(warm_seconds, 2),
             "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if on_gpu else None}]


def merge_rounds(measured: dict[tuple, list[dict]], settings: list[Setting]) -> list[dict]:
    """One row per (model, batch, setting, data): the median of every timed window of every round,
    the largest peak memory, and the ratio to the plain path's median."""
    order = {setting.name: i for i, setting in enumerate(settings)}
    results = []
    for key in sorted(measured, key=lambda k: (k[0], k[1], order[k[2]], k[3] != "synthetic")):
        rows = measured[key]
        merged = dict(rows[0])
        runs = sorted(r for row in rows for r in row.get("images_per_s_runs", []))
        if runs:
            merged.update(images_per_s=round(statistics.median(runs), 2), images_per_s_runs=runs,
                          rounds=len(rows), seconds=[s for row in rows for s in row["seconds"]])
            cpu_runs = sorted(r for row in rows for r in row.get("cpu_images_per_s_runs", []))
            if cpu_runs:
                merged.update(cpu_images_per_s=round(statistics.median(cpu_runs), 2), cpu_images_per_s_runs=cpu_runs)
            peaks = [row["peak_memory_gb"] for row in rows if row.get("peak_memory_gb") is not None]
            merged["peak_memory_gb"] = max(peaks) if peaks else None
            if "peak_memory_with_warmup_gb" in merged:
                warm = [row["peak_memory_with_warmup_gb"] for row in rows if row.get("peak_memory_with_warmup_gb")]
                merged["peak_memory_with_warmup_gb"] = max(warm) if warm else None
        results.append(merged)
    plain = {(r["model"], r["batch_size"], r["data"]): r.get("images_per_s") for r in results
             if r["setting"] == PLAIN.name}
    for row in results:
        reference = plain.get((row["model"], row["batch_size"], row["data"]))
        row["ratio_vs_plain"] = (round(row["images_per_s"] / reference, 3)
                                 if reference and row.get("images_per_s") else None)
    # Against the reference loop of the same precision and memory format on synthetic float views
    # (for folder rows too: the goal is the folder figure over the obvious loop).
    loops = {(r["model"], r["batch_size"], r["precision"], r["memory_format"]): r
             for r in results if r.get("loop") == "reference"}
    for row in results:
        loop = loops.get((row["model"], row["batch_size"], row["precision"], row["memory_format"]), {})
        for field, ratio in (("images_per_s", "ratio_vs_reference"), ("cpu_images_per_s", "cpu_ratio_vs_reference")):
            if field in row or ratio == "ratio_vs_reference":
                row[ratio] = (round(row[field] / loop[field], 3) if loop.get(field) and row.get(field) else None)
    return results


def release(setting: Setting) -> None:
    """Free what the last measurement held (its model is gone with its frame)."""
    gc.collect()
    if setting.compile:
        torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_args(argv=None):
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def listed(kind=str, choices=None):
        def parse(text):
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
            bad = [v for v in values if choices and v not in choices]
            if bad or not values:
                raise argparse.ArgumentTypeError(f"expected a comma-separated list of {choices or kind.__name__}")
            return values
        return parse

    parser.add_argument("--model", type=listed(), default=["resnet50" if on_gpu else "resnet18"],
                        help="timm model names, comma-separated")
    parser.add_argument("--batch-size", type=listed(int), default=[64 if on_gpu else 16],
                        help="images per step (each gives 2 views), comma-separated")
    parser.add_argument("--size", type=int, default=224 if on_gpu else 64, help="crop size in pixels")
    parser.add_argument("--small-input", action="store_true", help="3x3 stem without max-pool (tiny images)")
    parser.add_argument("--precision", type=listed(choices=["auto", "fp32", "bf16", "fp16"]), default=["auto"],
                        help="fast-path precisions (auto: bf16 on GPUs that support it, else fp16; fp32 on CPU)")
    parser.add_argument("--memory-format", type=listed(choices=["auto", "nchw", "nhwc"]), default=["auto"],
                        help="fast-path memory formats (auto: nhwc on a GPU)")
    parser.add_argument("--compile", type=listed(choices=["off", "on"]), default=["off"],
                        help="fast path with torch.compile off and/or on")
    parser.add_argument("--data-path", type=listed(choices=["cpu", "device"]), default=["device"],
                        help="fast-path augmentation: cpu (torchvision in workers) or device (supcon.gpu_augment)")
    parser.add_argument("--grad-checkpointing", type=listed(choices=["off", "on"]), default=["off"],
                        help="fast path with activation checkpointing off and/or on")
    parser.add_argument("--chunk-size", type=listed(int), default=[0],
                        help="fast path with gradient caching: images per forward pass, comma-separated (0: the whole "
                             "batch); a chunk size at or above the batch is the whole batch")
    parser.add_argument("--data", type=listed(choices=["synthetic", "folder"]), default=["synthetic", "folder"],
                        help="synthetic: compute only; folder: real JPEGs through the loader")
    parser.add_argument("--data-folder", help="an ImageFolder of JPEGs [default: generate --gen-images 250x250 JPEGs]")
    parser.add_argument("--gen-images", type=int, default=1024 if on_gpu else 256)
    parser.add_argument("--num-workers", type=int, default=min(16, os.cpu_count() or 1) if on_gpu else 1)
    parser.add_argument("--warmup", type=int, default=15 if on_gpu else 2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=60 if on_gpu else 6, help="timed steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per measurement")
    parser.add_argument("--rounds", type=int, default=1 if on_gpu else 3,
                        help="measure every setting this many times, alternating their order (median of all windows)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU compute)")
    parser.add_argument("--out", help="JSON file or folder [default: benchmarks/]")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain path (no ratio_vs_plain)")
    parser.add_argument("--reference", choices=["on", "off"], default="on",
                        help="also time the 40-line reference loop at each fast (precision, memory format), "
                             "and plain's fp32/nchw; every row gets ratio_vs_reference")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("timm", "accelerate", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    samples, generated = [], None
    if "folder" in args.data:
        samples, generated = bench.folder_samples(args.data_folder, args.gen_images, logger)
        needed = args.steps * max(args.batch_size)
        if len(samples) < needed:
            logger.info("%d images for %d timed source images: images repeat (from the page cache)", len(samples),
                        needed)
    fast = fast_settings(args, on_gpu)
    settings = ([] if args.no_plain else [PLAIN]) + fast
    if args.reference == "on":
        settings += reference_settings(([] if args.no_plain else [PLAIN]) + fast, on_gpu)
    measured: dict[tuple, list[dict]] = {}
    for round_index in range(args.rounds):
        # Alternate the order between rounds, so a machine that slows down or speeds up over time
        # (other users, thermals) does not favour whichever setting runs first.
        ordered = settings if round_index % 2 == 0 else settings[::-1]
        for model_name, batch in itertools.product(args.model, args.batch_size):
            for setting in ordered:
                logger.info("round %d/%d, %s batch %d: %s", round_index + 1, args.rounds, model_name, batch,
                            setting.name)
                try:
                    rows = measure(setting, model_name, batch, args, samples)
                except torch.cuda.OutOfMemoryError as exc:  # report, keep going with the other settings
                    logger.warning("out of memory: %s", str(exc).splitlines()[0])
                    rows = [{"model": model_name, "batch_size": batch, "size": args.size, "setting": setting.name,
                             **asdict(setting), "data": data, "error": "out of memory"} for data in args.data]
                release(setting)
                for row in rows:
                    logger.info("  %-9s %10s img/s  peak %s GB", row["data"], row.get("images_per_s"),
                                row.get("peak_memory_gb"))
                    measured.setdefault((model_name, batch, setting.name, row["data"]), []).append(row)
    results = merge_rounds(measured, settings)
    report = bench.header("train", device)
    report["settings"] = {
        "models": args.model, "batch_sizes": args.batch_size, "size": args.size, "small_input": args.small_input,
        "views_per_image": N_VIEWS, "warmup_steps": args.warmup, "timed_steps": args.steps, "repeats": args.repeats,
        "rounds": args.rounds,
        "data": args.data,
        "data_folder": args.data_folder or (f"generated: {args.gen_images} JPEGs 250x250" if samples else None),
        "folder_images": len(samples), "num_workers": args.num_workers,
        "plain": asdict(PLAIN), "unit": "source images per second (each image gives 2 views of --size px)",
    }
    report["results"] = results
    columns = ["model", "batch", "data", "setting", "img/s", "x plain", "x reference", "peak GB"]
    if not on_gpu:
        columns[-1:] = ["img per CPU s", "x reference (CPU time)"]
    rows = [[r["model"], r["batch_size"], r["data"] + (f" ({r['num_workers']} workers)" if "num_workers" in r else ""),
             r["setting"], r.get("images_per_s", r.get("error")), r.get("ratio_vs_plain"), r.get("ratio_vs_reference")]
            + ([r.get("peak_memory_gb")] if on_gpu else [r.get("cpu_images_per_s"), r.get("cpu_ratio_vs_reference")])
            for r in results]
    title = (f"{report['device']['name']} ({report['device']['type']}), torch {report['versions']['torch']}, "
             f"{args.size} px, 2 views per image")
    bench.publish(report, args.out, "train", title, columns, rows, generated)
    return report


if __name__ == "__main__":
    main()
