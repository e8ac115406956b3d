"""DeviceAugment now against an earlier commit's, in one process: device ops per batch, CPU time, same output.

Device ops are counted with the pixels on the ``meta`` device (what a GPU would launch, see
scripts/profile_step.py); CPU time per batch is ``time.thread_time`` over alternating windows (robust
to other jobs on a shared machine), on real pixels and, for the host's share alone, on meta pixels;
the outputs of both for the same parameters must agree.

    .venv/bin/python scripts/compare_augment.py --rev bb0bffa --batch-size 64 --size 112 --threads 1

Writes a JSON (--out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from bench_common import REPO, header, markdown_table, write_json  # noqa: E402
from profile_step import augment_counts  # noqa: E402

import supcon.gpu_augment as current  # noqa: E402


def module_at(rev: str, folder: str):
    """``supcon/gpu_augment.py`` as it was at git revision ``rev``, imported under another name."""
    source = subprocess.run(["git", "show", f"{rev}:supcon/gpu_augment.py"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    path = Path(folder) / f"gpu_augment_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"gpu_augment_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", required=True, help="git revision of the implementation to compare against")
    parser.add_argument("--batch-size", type=int, default=64, help="source images (2 views each)")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--batches", type=int, default=3, help="batches per window")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="JSON file or folder [default: benchmarks/]")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        modules = {args.rev: module_at(args.rev, folder), "now": current}
        pixels = torch.randint(0, 256, (args.batch_size, 2, args.size, args.size, 3), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))
        augments = {}
        for name, module in modules.items():
            spec = module.AugmentSpec.supcon(args.size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
            augments[name] = module.DeviceAugment(spec, "cpu", seed=0, channels_last=args.channels_last)
        outputs = {name: augment(pixels, 5) for name, augment in augments.items()}
        max_difference = (outputs["now"] - outputs[args.rev]).abs().max().item()
        # Host time alone: the same calls with the pixels on the meta device (dispatch, no pixel work).
        # Meta kernels are slower to dispatch than CUDA launches, so read this as a ratio only.
        shapes = torch.empty(pixels.shape, dtype=torch.uint8, device="meta")
        on_meta = {}
        for name, module in modules.items():
            spec = module.AugmentSpec.supcon(args.size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
            on_meta[name] = module.DeviceAugment(spec, "meta", seed=0, channels_last=args.channels_last)
            on_meta[name](shapes, 0)
        seconds = {name: [] for name in augments}
        host_seconds = {name: [] for name in augments}
        for window in range(args.windows):
            for name in (list(augments) if window % 2 == 0 else list(augments)[::-1]):
                for runner, pixels_in, times in ((augments, pixels, seconds), (on_meta, shapes, host_seconds)):
                    start = time.thread_time()
                    for step in range(args.batches):
                        runner[name](pixels_in, step)
                    times[name].append((time.thread_time() - start) / args.batches)
        results = {}
        for name, module in modules.items():
            device_ops, host_ops, syncs = augment_counts(args.batch_size, args.size, args.channels_last, module=module)
            results[name] = {"device_ops_per_batch": device_ops, "host_ops_per_batch": host_ops,
                             "device_syncs_per_batch": syncs,
                             "cpu_seconds_per_batch": round(statistics.median(seconds[name]), 5),
                             "meta_host_seconds_per_batch": round(statistics.median(host_seconds[name]), 5),
                             "cpu_seconds_windows": [round(s, 5) for s in seconds[name]]}
    report = header("compare_augment", torch.device("cpu"))
    report["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    report["max_abs_difference"] = max_difference
    report["results"] = results
    path = write_json(report, args.out, "augment")
    base, host_base = (results[args.rev][k] for k in ("cpu_seconds_per_batch", "meta_host_seconds_per_batch"))
    rows = [[name, r["device_ops_per_batch"], r["host_ops_per_batch"], r["device_syncs_per_batch"],
             r["cpu_seconds_per_batch"], round(r["cpu_seconds_per_batch"] / base, 3),
             r["meta_host_seconds_per_batch"], round(r["meta_host_seconds_per_batch"] / host_base, 3)]
            for name, r in results.items()]
    print(f"\nDeviceAugment, {args.batch_size} x 2 views at {args.size} px, CPU, {args.threads} thread(s); "
          f"max |now - {args.rev}| = {max_difference:.2e}\n")
    print(markdown_table(["implementation", "device ops/batch", "host ops/batch", "device syncs/batch",
                          "CPU s/batch", f"x {args.rev}", "host s/batch (meta)", f"x {args.rev} (host)"], rows))
    print(f"\nwritten: {path}")
    return report


if __name__ == "__main__":
    main()
