"""Decoded-cache build speed on real original-resolution chest X-rays.

Compares, in one invocation and on the same files:
  baseline      a plain loop in one process: Image.open(f).convert("L").resize((size, size))
  build_cache   cxr_ray.data.list_source("kaggle", ...) + build_cache(...) as a user runs it
                (JPEG draft DCT downscaling, process pool over all cores; pool start-up,
                hashing, the short-side resize + crop and writing the .npy are all included)
  workers=1     the same build_cache call with workers=1: DCT downscaling only, no pool

Each measurement is repeated --repeat times (interleaved, so background load hits all three
alike) into a fresh temporary cache directory; the median and min/max are printed.
Figures only: nothing here asserts on time.

    .venv/bin/python benchmarks/bench_decode.py [--size 224] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import machine

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SAMPLE = DATA / "chest_xray_original_sample"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--size", type=int, default=224, help="cache image side in px (default 224)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of each measurement (default 3)")
    p.add_argument("--path", default=str(SAMPLE),
                   help=f"Kaggle-layout folder of JPEGs (default {SAMPLE})")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed passes of each variant before timing (default 1)")
    p.add_argument("--workers", type=int, default=None,
                   help="build_cache pool size (default: all cores, as build_cache does)")
    return p.parse_args()


def summary(rates: list[float], cpu_ms: list[float]) -> str:
    return (f"{statistics.median(rates):8.1f} images/s  (median of {len(rates)}; "
            f"min {min(rates):.1f}, max {max(rates):.1f})  cpu {statistics.median(cpu_ms):5.2f} ms/image")


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its reaped children (the pool's workers)."""
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def main() -> int:
    args = parse_args()
    if not Path(args.path).is_dir():
        print(f"bench_decode: data folder {args.path} is absent; this benchmark needs the shared real data "
              f"at {DATA} (see its README.md). Nothing measured.", file=sys.stderr)
        return 1
    if args.repeat < 1:
        print("bench_decode: --repeat must be >= 1", file=sys.stderr)
        return 2

    from PIL import Image

    from cxr_ray import data

    source = data.list_source("kaggle", args.path)
    files = [os.path.join(source.path, item) for item in source.items["item"]]
    n = len(files)
    total_mb = sum(os.path.getsize(f) for f in files) / 1e6
    for f in files:  # warm the page cache so no variant pays the first disk read
        Path(f).read_bytes()

    def baseline() -> None:
        for f in files:
            Image.open(f).convert("L").resize((args.size, args.size))

    def cache(workers: int | None) -> None:
        with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
            src = data.list_source("kaggle", args.path)
            c = data.build_cache(src, args.size, cache_root=tmp, workers=workers, progress=False)
            if c.images.shape != (n, args.size, args.size):  # a sanity check on the work, not on time
                raise SystemExit(f"bench_decode: build_cache returned {c.images.shape}, expected {(n, args.size, args.size)}")

    pool_workers = args.workers or os.cpu_count() or 1
    variants = {
        "baseline (PIL open/convert/resize, 1 process)": baseline,
        f"build_cache (draft + pool of {pool_workers})": lambda: cache(args.workers),
        "build_cache workers=1 (draft only, no pool)": lambda: cache(1),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    cpu_ms: dict[str, list[float]] = {k: [] for k in variants}
    print(f"bench_decode: {n} JPEGs ({total_mb:.1f} MB) from {args.path}", flush=True)
    print(f"  size {args.size}px, repeat {args.repeat} (+{args.warmup} untimed), os.cpu_count() {os.cpu_count()}, "
          f"{machine()}", flush=True)
    for _ in range(args.warmup):
        for fn in variants.values():
            fn()
    for r in range(args.repeat):
        for name, fn in variants.items():
            c, t = cpu_seconds(), time.perf_counter()
            fn()
            rates[name].append(n / (time.perf_counter() - t))
            cpu_ms[name].append(1000 * (cpu_seconds() - c) / n)
        print(f"  rep {r + 1}: " + "  ".join(f"{v[-1]:.1f}" for v in rates.values())
              + " images/s (baseline, build_cache, workers=1)", flush=True)

    names = list(variants)
    base, pool, single = (statistics.median(rates[k]) for k in names)
    width = max(map(len, names))
    print()
    for name in names:
        print(f"{name:<{width}}  {summary(rates[name], cpu_ms[name])}")
    print(f"{'ratio build_cache / baseline':<{width}}  {pool / base:8.2f}x  (target >= 3x on 2 cores)")
    print(f"{'  of which DCT draft (workers=1 / baseline)':<{width}}  {single / base:8.2f}x")
    print(f"{'  of which the pool (build_cache / workers=1)':<{width}}  {pool / single:8.2f}x")
    cb, cp = (statistics.median(cpu_ms[k]) for k in names[:2])
    print(f"{'cpu-time ratio baseline / build_cache':<{width}}  {cb / cp:8.2f}x  (work saved per image, "
          f"insensitive to other load; x {pool_workers} cores is the ceiling of the wall-clock ratio)")
    print(f"at end: {machine()}  (other work on the machine lowers every figure; compare rows of one run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
