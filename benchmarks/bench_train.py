"""Training throughput of one Ray Train worker against the same loop run bare, same work.

In one invocation, on the same synthetic cache, model, batches, thread count and seed:
  ray    cxr_ray.training.fit(...): one TorchTrainer worker on local Ray (runtime.connect(num_cpus=2))
  bare   cxr_ray.training.train_loop(...) in this process with a LocalWorld (no Ray at all):
         the very loop the Ray worker runs, torch.set_num_threads(same)
Both record each epoch in their run's metrics.csv (images_per_s, data_wait_fraction, epoch times),
which is what this script reads. Epoch 1 is warm-up on both sides; figures are the median over
epochs 2..E. The bare loop runs --bare-runs times, split before and after the Ray run so that
background load on a shared machine hits both sides alike. Figures only: nothing here asserts.

    .venv/bin/python benchmarks/bench_train.py [--backbone mobilenetv3_small_050] [--epochs 4]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import machine


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--backbone", default="mobilenetv3_small_050",
                   help="timm backbone (default mobilenetv3_small_050; resnet10t is about 4x slower per image, "
                        "use --images 1200 with it to keep the run near 3 minutes)")
    p.add_argument("--size", type=int, default=64, help="image side in px (default 64)")
    p.add_argument("--images", type=int, default=2400,
                   help="synthetic images to generate; about 70%% land in train (default 2400)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per side, the first is warm-up (default 4)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on both sides (default 1)")
    p.add_argument("--augment", choices=("none", "mild", "strong"), default="mild", help="tensor augmentation (default mild)")
    p.add_argument("--bare-runs", type=int, default=2,
                   help="bare-loop runs, split before/after the Ray run (default 2; 1 = before only)")
    return p.parse_args()


def steady(log: list[dict], key: str) -> list[float]:
    """Values of ``key`` for epochs 2..E (epoch 1 is warm-up)."""
    return [m[key] for m in log if m["epoch"] >= 2]


def fmt(values: list[float], unit: str, scale: float = 1.0, digits: int = 1) -> str:
    v = [x * scale for x in values]
    return (f"{statistics.median(v):8.{digits}f} {unit}  (median of {len(v)} epochs; "
            f"min {min(v):.{digits}f}, max {max(v):.{digits}f})")


def main() -> int:
    args = parse_args()
    if args.epochs < 2:
        print("bench_train: --epochs must be >= 2 (epoch 1 is warm-up)", file=sys.stderr)
        return 2

    import pandas as pd
    import ray

    from cxr_ray import config, data, runtime, training

    cfg = config.TrainConfig(backbone=args.backbone, image_size=args.size, epochs=args.epochs,
                             batch_size=args.batch, threads=args.threads, augment=args.augment)
    cfg.validate("bench_train")
    print(f"bench_train: {args.backbone} at {args.size}px, batch {args.batch}, {args.threads} thread(s), "
          f"augment {args.augment}, {args.epochs} epochs (median of 2..{args.epochs}), "
          f"{args.images} synthetic images", flush=True)
    print(f"  start: {machine()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        prepared = data.prepare("synthetic", None, args.size, None, synthetic_images=args.images,
                                cache_root=tmp / "cache", progress=False)
        print(f"  data: {len(prepared.rows['train'])} train / {len(prepared.rows['val'])} val images, "
              f"prepared in {time.perf_counter() - t:.1f} s", flush=True)

        def history(run_dir: Path) -> list[dict]:
            return pd.read_csv(run_dir / "metrics.csv").to_dict("records")

        runtime.connect(num_cpus=2, quiet=True, log_file=str(tmp / "driver.log"))
        try:
            data_ref = runtime.put_data(prepared)
            shared = ray.get(data_ref)  # the very arrays the Ray worker reads (zero-copy from the store)
            bare_logs: list[list[dict]] = []
            bare_walls: list[float] = []

            def run_bare(tag: str) -> None:
                run_dir = tmp / f"bare{len(bare_logs)}"
                t = time.perf_counter()
                training.train_loop(cfg, shared, str(run_dir), training.LocalWorld(), keep_checkpoints=1)
                bare_walls.append(time.perf_counter() - t)
                bare_logs.append(log := history(run_dir))
                print(f"  bare ({tag}): " + "  ".join(f"e{m['epoch']} {m['images_per_s']:.0f}" for m in log)
                      + f" img/s; {bare_walls[-1]:.1f} s for {cfg.epochs} epochs; {machine()}", flush=True)

            before = max(1, (args.bare_runs + 1) // 2)
            for _ in range(before):
                run_bare("before Ray")

            t = time.perf_counter()
            result = training.fit(cfg, data_ref, name="ray", storage_path=str(tmp), workers=1,
                                  cpus_per_worker=args.threads, max_failures=0, keep_checkpoints=1)
            ray_wall = time.perf_counter() - t
            if result.error:
                print(f"bench_train: the Ray Train run failed: {result.error}", file=sys.stderr)
                return 1
            ray_log = history(tmp / "ray")
            print("  ray:          " + "  ".join(f"e{m['epoch']} {m['images_per_s']:.0f}" for m in ray_log)
                  + f" img/s; fit() took {ray_wall:.1f} s for {cfg.epochs} epochs; {machine()}", flush=True)

            for _ in range(args.bare_runs - before):
                run_bare("after Ray")
        finally:
            ray.shutdown()

    bare_all = [m for log in bare_logs for m in log]
    ray_ips, bare_ips = steady(ray_log, "images_per_s"), steady(bare_all, "images_per_s")
    ray_wait, bare_wait = steady(ray_log, "data_wait_fraction"), steady(bare_all, "data_wait_fraction")
    r, b = statistics.median(ray_ips), statistics.median(bare_ips)
    loss_gap = abs(ray_log[-1]["train_loss"] - bare_logs[0][-1]["train_loss"])
    print()
    print(f"Ray Train images/s (1 worker)   {fmt(ray_ips, 'images/s')}")
    print(f"bare loop images/s              {fmt(bare_ips, 'images/s')}")
    print(f"ratio Ray / bare                {r / b:8.3f}   (target >= 0.95)")
    print(f"Ray data-wait fraction          {fmt(ray_wait, '%', 100, 2)}   (target < 5%)")
    print(f"bare data-wait fraction         {fmt(bare_wait, '%', 100, 2)}")
    in_loop = sum(m["epoch_time_s"] for m in ray_log)
    print(f"wall: fit() {ray_wall:.1f} s vs bare loop {statistics.median(bare_walls):.1f} s for {cfg.epochs} epochs; "
          f"fit = {in_loop:.1f} s in the loop (training, validation) + {ray_wall - in_loop:.1f} s Ray Train start-up, "
          f"checkpoints and shutdown")
    print(f"last-epoch train_loss: ray {ray_log[-1]['train_loss']:.5f}, bare {bare_logs[0][-1]['train_loss']:.5f} "
          f"(|diff| {loss_gap:.1e}: the same loop on both sides)")
    print(f"end: {machine()}  (other work on the machine lowers every figure; compare rows of one run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
