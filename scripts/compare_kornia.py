"""Why supcon.gpu_augment does not use kornia: distribution and speed, measured (kornia is optional).

Checks, for kornia's two colour-jitter transforms against torchvision's ColorJitter semantics:

1. op order: torchvision draws a random order of the four ops per image; does kornia?
2. formulas: for the same factors and order, how far is kornia's output from torchvision's tensor ops?
3. speed: flip + jitter (p 0.8) + grayscale (p 0.2) + normalise on one batch, kornia's
   AugmentationSequential against supcon.gpu_augment.DeviceAugment.apply.

    pip install kornia   # or: pip install --target DIR --no-deps kornia kornia_rs; PYTHONPATH=DIR
    .venv/bin/python scripts/compare_kornia.py [--batch 64] [--size 224] [--device cuda] [--out benchmarks/]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402,F401  # puts the repository on sys.path
import torch  # noqa: E402
from torchvision.transforms.v2 import functional as F  # noqa: E402

from supcon.gpu_augment import AugmentSpec, DeviceAugment  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_reference(x: torch.Tensor, factors: list[float], order: list[int]) -> torch.Tensor:
    ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    for op in order:
        x = ops[op](x, factors[op])
    return x


def timed(fn, repeat: int, device: torch.device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="source images (2 views each)")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the JSON here (a file, or a folder for kornia_<device>_<date>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import kornia
        import kornia.augmentation as K
    except ImportError:
        print("kornia is not installed (pip install kornia); nothing to compare")
        return {}
    device = torch.device(args.device)
    report: dict = {"kornia": kornia.__version__, "torch": torch.__version__, "augment_device": str(device),
                    "batch_views": 2 * args.batch, "size": args.size}

    # 1. Op order: one per call (batch) or one per image?
    x = torch.rand(64, 3, 16, 16)
    for name in ("ColorJitter", "ColorJiggle"):
        aug = getattr(K, name)(0.4, 0.4, 0.4, 0.1, p=1.0)
        aug(x)
        order = aug._params["order"]
        report[f"{name}_order_shape"] = list(order.shape)
        report[f"{name}_distinct_orders_in_a_batch_of_64"] = 1 if order.dim() == 1 else len({tuple(o) for o in
                                                                                           order.tolist()})

    # 2. Formulas: same factors and order as torchvision's tensor ops.
    torch.manual_seed(0)
    image = torch.rand(1, 3, 32, 32)
    worst = {"ColorJitter": 0.0, "ColorJiggle": 0.0, "supcon.gpu_augment": 0.0}
    spec = AugmentSpec.supcon(32, MEAN, STD)
    ours = DeviceAugment(spec)
    for trial in range(20):
        factors = [float(torch.empty(1).uniform_(0.6, 1.4)) for _ in range(3)]
        factors.append(float(torch.empty(1).uniform_(-0.1, 0.1)))
        order = torch.randperm(4).tolist()
        expected = torchvision_reference(image[0], factors, order)
        for name in ("ColorJitter", "ColorJiggle"):
            aug = getattr(K, name)(0.4, 0.4, 0.4, 0.1, p=1.0)
            aug(image)
            params = dict(aug._params)
            params.update(brightness_factor=torch.tensor([factors[0]]), contrast_factor=torch.tensor([factors[1]]),
                          saturation_factor=torch.tensor([factors[2]]), hue_factor=torch.tensor([factors[3]]),
                          order=torch.tensor(order))
            got = aug(image, params=params)[0]
            worst[name] = max(worst[name], float((got - expected).abs().max()))
        params = ours.draw(1, trial)
        params.flip[:] = False
        params.grayscale[:] = False
        params.jittered[:] = True
        params.order[0] = torch.tensor(order)
        params.brightness[0], params.contrast[0], params.saturation[0], params.hue[0] = factors
        pixels = (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8)[None]
        got = ours.apply(pixels, params)[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
        expected = torchvision_reference(pixels[0].permute(2, 0, 1).float() / 255, factors, order)
        worst["supcon.gpu_augment"] = max(worst["supcon.gpu_augment"], float((got - expected).abs().max()))
    report["max_abs_difference_from_torchvision_ops_in_0_1_units"] = {k: round(v, 6) for k, v in worst.items()}

    # 3. Speed on one batch of views.
    n = 2 * args.batch
    pixels = torch.randint(0, 256, (n, args.size, args.size, 3), dtype=torch.uint8, device=device)
    sequential = K.AugmentationSequential(
        K.RandomHorizontalFlip(), K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), K.RandomGrayscale(p=0.2),
        K.Normalize(torch.tensor(MEAN), torch.tensor(STD)),
    ).to(device)
    ours = DeviceAugment(AugmentSpec.supcon(args.size, MEAN, STD), device)

    def run_kornia():
        return sequential(pixels.permute(0, 3, 1, 2).float() / 255)

    def run_ours():
        return ours.apply(pixels, ours.draw(n, 0))

    report["seconds_per_batch"] = {"kornia_AugmentationSequential": round(timed(run_kornia, args.repeat, device), 4),
                                   "supcon.gpu_augment": round(timed(run_ours, args.repeat, device), 4)}
    print(json.dumps(report, indent=2))
    if args.out:
        full = {**bench_common.header("kornia", device), **report}
        print(f"written: {bench_common.write_json(full, args.out, 'kornia')}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
