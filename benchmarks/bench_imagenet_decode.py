"""Images/s of the ImageNet input path, dkl_lib.data.imagenet (not a test; prints a table).

    python benchmarks/bench_imagenet_decode.py                    # 1 and 2 decoding threads
    python benchmarks/bench_imagenet_decode.py --workers 1,2,4,8 --images 512 --json out.json
    python benchmarks/bench_imagenet_decode.py --root /data/imagenet   # a real ImageNet copy

Without ``--root`` it writes a temporary folder of ImageNet-like JPEGs first (500 x 375, quality 90,
smooth random content plus noise: about 96 KiB per file, near the ~110 KB of an average ImageNet photo) — no data set
and no network needed. It then times batches of ``--batch`` images through ``LazyImages.take``:
the training view (RandomResizedCrop 224 + flip) and the validation view (Resize 256 + CenterCrop
224), for each thread count, alternating the thread counts round by round (so they are measured side
by side) and reporting medians. Compare the result with the images/s a training step consumes
(``benchmarks/bench_train.py`` / ``gpu_check.sh`` on the GPU) to see how many CPU cores a GPU needs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _args, beside this file
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _args import at_least, int_list  # noqa: E402
from dkl_lib import data as D  # noqa: E402


def write_fake_imagenet(root: Path, images: int, classes: int = 4, seed: int = 0) -> None:
    """ImageNet-like JPEGs: low-frequency random colour fields plus mild noise, 500 x 375."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", images), ("val", max(classes, images // 4))):
        for c in range(classes):
            (root / split / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        for k in range(n):
            coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
            arr = np.asarray(img, dtype=np.int16) + rng.integers(-32, 33, size=(375, 500, 3))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(
                root / split / f"n{k % classes:08d}" / f"img{k}.JPEG", quality=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="an ImageNet folder (train/, val/); default: fake JPEGs")
    parser.add_argument("--images", type=at_least(1), default=256, help="fake training images to write (default 256)")
    parser.add_argument("--workers", type=int_list(1), default=[1, 2], help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--batch", type=at_least(1), default=64)
    parser.add_argument("--rounds", type=at_least(1), default=5)
    parser.add_argument("--size", type=at_least(1), default=224)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    workers = args.workers
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        if not args.root:
            write_fake_imagenet(root, args.images)
        sets = {w: D.imagenet(root, size=args.size, workers=w) for w in workers}
        first = next(iter(sets.values()))
        files = first.x_train.files[:50]
        kib = statistics.mean(os.path.getsize(f) for f in files) / 1024
        rows = min(args.batch, first.n_train, first.n_test)
        times = {(w, view): [] for w in workers for view in ("train", "val")}
        for w, d in sets.items():  # warm-up: start the thread pools, fill the page cache
            d.x_train.take(torch.arange(rows))
            d.x_test.take(torch.arange(rows))
        for r in range(args.rounds):
            for w, d in sets.items():
                idx = torch.randperm(first.n_train, generator=torch.Generator().manual_seed(r))[:rows]
                for view, split in (("train", d.x_train), ("val", d.x_test)):
                    pick = idx if view == "train" else torch.arange(rows)
                    t0 = time.perf_counter()
                    split.take(pick)
                    times[(w, view)].append(time.perf_counter() - t0)
    result = [{"workers": w, "view": view, "batch": rows, "images_per_s": rows / statistics.median(t)}
              for (w, view), t in times.items()]
    print(f"ImageNet input path ({'fake JPEGs, 500x375' if not args.root else args.root}, mean file "
          f"{kib:.0f} KiB, {os.cpu_count()} CPUs): images/s, median of {args.rounds} batches of {rows}")
    print("| threads | train view (RandomResizedCrop + flip) | val view (Resize + CenterCrop) |")
    print("|---|---|---|")
    by = {(r["workers"], r["view"]): r["images_per_s"] for r in result}
    for w in workers:
        print(f"| {w} | {by[(w, 'train')]:.0f} | {by[(w, 'val')]:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"file_kib": kib, "results": result}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
