"""Where the project's training step spends more than the 40-line reference loop, counted on any device.

Counts, per training step and in one process, for the project's step (``supcon.epoch.train_one_epoch``
on float views, or with ``DeviceAugment`` on uint8 crops) and for bench_train.py's reference loop:

* **ops**: aten operators that run a kernel (views and metadata ops excluded), seen through a
  ``TorchDispatchMode`` below autograd and autocast, so the backward pass and the optimizer are
  included: on a GPU each is (at least) one kernel launch, which is what bounds a launch-bound step;
* **host syncs**: operators that make the host wait for the device (``.item()``, ``.tolist()``,
  ``bool()``/``float()`` of a tensor, and data-dependent output sizes: ``nonzero``, ``masked_select``,
  ``unique``...), counted on tensors that live on the training device;
* **CPU time** per step (``time.thread_time``, less sensitive than wall time to other jobs on a
  shared machine), median over alternating windows. On a GPU this is the host thread's time, which
  includes waiting (spinning) at the syncs: read it with the counts, and throughput from bench_train.py.
  On a GPU, CUDA's own sync debug mode also counts the synchronising calls (a cross-check).

The same counts on the CPU and on a GPU (the ops are the same; only their kernels differ), so this
finds launch and sync overhead without a GPU. ``DeviceAugment`` alone is counted per batch too.

    .venv/bin/python scripts/profile_step.py                      # resnet18 @32 px, batch 8, CPU
    .venv/bin/python scripts/profile_step.py --model resnet50 --size 224 --batch-size 64 --precision bf16

Writes a JSON (--out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from bench_common import MEAN, STD, header, markdown_table, write_json  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

#: Operators whose result the host must wait for (a value, or a data-dependent output size).
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "repeat_interleave", "equal", "is_nonzero", "item"}
#: Operators that launch no kernel (they only make a tensor's metadata).
FREE_OPS = {"detach", "alias", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
            "new_empty_strided", "set_", "resize_", "is_same_size", "_has_compatible_shallow_copy_type"}


#: Tensor methods that read device memory from the host without an aten op on the CPU (on a GPU they
#: copy to the host first); patched while an OpCounter is active.
HOST_READS = ("tolist", "numpy", "cpu")


class OpCounter(TorchDispatchMode):
    """Count the kernel-launching aten ops and the host syncs on ``device`` tensors while active.

    Syncs are the ``SYNC_OPS`` on a ``device`` tensor, the ``HOST_READS`` of one, copies from the
    device to the host (GPU), and ``torch.cuda.synchronize()``. On the CPU every tensor is a
    ``device`` tensor, so host-side bookkeeping on CPU tensors (e.g. ``DeviceAugment``'s parameter
    draw) counts too: run that on the ``meta`` device to separate it (see ``augment_counts``).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self.device_ops: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, object] = {}
        self._reading = 0

    def _on_device(self, tensors) -> bool:
        return any(isinstance(t, torch.Tensor) and t.device.type == self.device.type for t in tensors)

    def _to_host(self, name: str, args, kwargs) -> bool:
        """A copy from the device to the host memory (the host then waits for it)."""
        if name == "copy_":
            return args[0].device.type == "cpu" and args[1].device.type == self.device.type
        if name == "_to_copy":
            target = kwargs.get("device")
            return target is not None and torch.device(target).type == "cpu" and args[0].device == self.device
        return False

    def __enter__(self):
        def counted(name, method):
            def wrapper(tensor, *args, **kwargs):
                if tensor.device.type == self.device.type and not self._reading:
                    self.syncs[name] += 1
                self._reading += 1  # its own copy to the host is the same sync
                try:
                    return method(tensor, *args, **kwargs)
                finally:
                    self._reading -= 1
            return wrapper

        for name in HOST_READS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, counted(name, self._saved[name]))
        self._saved["synchronize"] = torch.cuda.synchronize

        def synchronize(*args, **kwargs):
            self.syncs["cuda.synchronize"] += 1
            return self._saved["synchronize"](*args, **kwargs)

        torch.cuda.synchronize = synchronize
        return super().__enter__()

    def __exit__(self, *exc):
        for name in HOST_READS:
            setattr(torch.Tensor, name, self._saved[name])
        torch.cuda.synchronize = self._saved["synchronize"]
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if not func.is_view and name not in FREE_OPS:
            self.ops[name] += 1
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            target = kwargs.get("device") if name == "_to_copy" else None
            if self._on_device(tensors) or (target is not None and torch.device(target).type == self.device.type):
                self.device_ops[name] += 1
                if self._reading:
                    pass
                elif name in SYNC_OPS:
                    self.syncs[name] += 1
                elif self.device.type != "cpu" and self._to_host(name, args, kwargs):
                    self.syncs[name] += 1
        return func(*args, **kwargs)

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def total_device_ops(self) -> int:
        return sum(self.device_ops.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())


def _bench_train():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train_for_profile", Path(__file__).parent / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def project_step(args, data_path: str):
    """``run(steps) -> None``: train_one_epoch over ``steps`` synthetic batches, as bench_train builds it."""
    from supcon.gpu_augment import AugmentSpec, DeviceAugment
    from supcon.losses import SupConLoss
    from supcon.models import build_model
    from supcon.schedule import LRSchedule

    try:
        from supcon.epoch import train_one_epoch
        from supcon.processes import make_accelerator
    except ImportError:  # a checkout from before the split of issue 23: supcon.train and supcon.engine held them
        from supcon.engine import make_accelerator
        from supcon.train import train_one_epoch

    bench = _bench_train()
    bench._reset_accelerate()
    accelerator = make_accelerator(args.precision)
    device = accelerator.device
    torch.manual_seed(0)
    model = build_model(args.model, small_input=args.small_input)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = bench.project_optimizer(model.parameters(), device)
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = LRSchedule(0.05, epochs=1000, steps_per_epoch=10**6)
    setting = bench.Setting("p", args.precision, "nhwc" if args.channels_last else "nchw", False, data_path, False,
                            False)
    images, labels = bench.synthetic_batch(setting, args.batch_size, args.size, device)
    augment = None
    if data_path == "device":
        spec = AugmentSpec.supcon(args.size, MEAN, STD)
        augment = DeviceAugment(spec, device, seed=0, channels_last=args.channels_last)
    loss_fn = SupConLoss()

    def run(steps: int) -> None:
        train_one_epoch(model, loss_fn, bench._Repeat(images, labels, steps), optimizer, schedule, accelerator,
                        epoch=0, augment=augment, channels_last=args.channels_last, log_every=args.log_every)

    return run, device


def reference_step(args):
    bench = _bench_train()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setting = bench.Setting("reference", args.precision, "nhwc" if args.channels_last else "nchw", False, "float",
                            False, False, loop="reference")
    run = bench.reference_run(setting, args.model, args.batch_size, args, device)
    return (lambda steps: run(steps)), device


def augment_only(args):
    from supcon.gpu_augment import AugmentSpec, DeviceAugment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = AugmentSpec.supcon(args.size, MEAN, STD)
    augment = DeviceAugment(spec, device, seed=0, channels_last=args.channels_last)
    pixels = torch.randint(0, 256, (args.batch_size, 2, args.size, args.size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)

    def run(steps: int) -> None:
        for step in range(steps):
            augment(pixels, step)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run, device


def augment_counts(batch_size: int, size: int, channels_last: bool = False, steps: int = 4,
                   seed: int = 0, module=None) -> tuple[float, float, float]:
    """``DeviceAugment`` per batch of ``batch_size`` x 2 views: (device ops, host ops, host syncs).

    The pixels live on the ``meta`` device (shapes only), so the ops on them are exactly what a GPU
    would launch, and the CPU-side work on the per-view parameters is counted apart from them.
    ``module``: another implementation of ``supcon.gpu_augment`` (e.g. an older commit's), to compare.
    """
    if module is None:
        import supcon.gpu_augment as module

    spec = module.AugmentSpec.supcon(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    augment = module.DeviceAugment(spec, "meta", seed=seed, channels_last=channels_last)
    pixels = torch.empty(batch_size, 2, size, size, 3, dtype=torch.uint8, device="meta")
    augment(pixels, steps)  # constants made once per device are not per batch
    with OpCounter("meta") as counter:
        for step in range(steps):
            augment(pixels, step)
    device_ops = counter.total_device_ops / steps
    return device_ops, counter.total_ops / steps - device_ops, counter.total_syncs / steps


def count(run, device, steps: int) -> OpCounter:
    run(1)  # warm-up: lazy state (optimizer momentum buffers, cuDNN plans) is not per step
    with OpCounter(device) as counter:
        run(steps)
    counter.cuda_sync_warnings = cuda_sync_warnings(run, steps) if device.type == "cuda" else None
    return counter


def cuda_sync_warnings(run, steps: int) -> int:
    """CUDA's own count of synchronising calls (``torch.cuda.set_sync_debug_mode``): a cross-check on a GPU."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def cpu_seconds(runs: dict, steps: int, windows: int) -> dict[str, float]:
    """Median CPU time per step of each runner, windows alternating between runners."""
    times = {name: [] for name in runs}
    for window in range(windows):
        for name in (list(runs) if window % 2 == 0 else list(runs)[::-1]):
            start = time.thread_time()
            runs[name][0](steps)
            times[name].append((time.thread_time() - start) / steps)
    return {name: statistics.median(values) for name, values in times.items()}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--small-input", action="store_true")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="counted steps (a multiple of --log-every)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--windows", type=int, default=6, help="CPU-time windows per runner (0: counts only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="JSON file or folder [default: benchmarks/]")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = {"project, float views": project_step(args, "cpu"),
            "project, device augmentation": project_step(args, "device"),
            "reference loop": reference_step(args),
            "DeviceAugment alone": augment_only(args)}
    counters = {name: count(run, device, args.steps) for name, (run, device) in runs.items()}
    seconds = cpu_seconds(runs, max(args.steps // 2, 1), args.windows) if args.windows else {}
    device = next(iter(runs.values()))[1]
    aug_device_ops, aug_host_ops, aug_syncs = augment_counts(args.batch_size, args.size, args.channels_last)
    report = header("profile_step", device)
    report["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    report["results"] = {name: {"ops_per_step": c.total_ops / args.steps, "syncs_per_step": c.total_syncs / args.steps,
                                "cpu_seconds_per_step": round(seconds[name], 5) if name in seconds else None,
                                "cuda_sync_warnings_per_step": (None if c.cuda_sync_warnings is None
                                                                else c.cuda_sync_warnings / args.steps),
                                "ops": dict(c.ops.most_common()), "syncs": dict(c.syncs)}
                         for name, c in counters.items()}
    report["results"]["DeviceAugment alone"].update(
        device_ops_per_batch=aug_device_ops, host_ops_per_batch=aug_host_ops, device_syncs_per_batch=aug_syncs)
    reference = counters["reference loop"].ops
    for name in ("project, float views", "project, device augmentation"):
        extra = counters[name].ops - reference
        report["results"][name]["ops_beyond_reference"] = dict(extra.most_common())
    path = write_json(report, args.out, "profile_step")
    ref_seconds = seconds.get("reference loop")
    rows = [[name, r["ops_per_step"], r["syncs_per_step"], r["cpu_seconds_per_step"],
             round(r["cpu_seconds_per_step"] / ref_seconds, 3) if ref_seconds and r["cpu_seconds_per_step"] else None]
            for name, r in report["results"].items()]
    print(f"\n{args.model} @{args.size} px, batch {args.batch_size} x 2 views, {args.precision}, "
          f"{'channels-last' if args.channels_last else 'NCHW'}, {device}, {args.steps} steps counted\n")
    print(markdown_table(["step", "ops/step", "host syncs/step", "CPU s/step", "x reference CPU time"], rows))
    print(f"\nDeviceAugment per batch on the meta device (what a GPU launches): {aug_device_ops:g} device ops, "
          f"{aug_host_ops:g} host ops on the per-view parameters, {aug_syncs:g} device syncs")
    for name in ("project, float views", "project, device augmentation"):
        print(f"\n{name}, ops beyond the reference loop: {report['results'][name]['ops_beyond_reference']}")
    print(f"\nwritten: {path}")
    return report


if __name__ == "__main__":
    main()
