"""Training throughput of one Ray Train worker against a bare PyTorch loop, same work.

In one invocation, on the same synthetic cache, model, batches, thread count and seed:
  ray    cxr_ray.training.fit(...) with one TorchTrainer worker on local Ray
         (cxr_ray.runtime.connect(num_cpus=2)); images_per_s and data_wait_fraction are
         read from each epoch's ray.train.report, collected by a UserCallback that appends
         them to a JSON-lines file.
  bare   the same step in this process (torch.set_num_threads(same)), assembled from the
         package's own pieces (build_model, make_optimizer, epoch_batches, Prefetcher,
         normalize, augment, the weighted BCE loss, grad clipping, the LambdaLR schedule),
         timed exactly as train_loop times it: images seen / wall time of the epoch's step
         loop, and data wait = time spent waiting for the Prefetcher's next batch.

Epoch 1 is warm-up on both sides; figures are the median over epochs 2..E. The bare loop
runs --bare-runs times, split before and after the Ray run so that background load on a
shared machine hits both sides alike. Figures only: nothing here asserts on time.

    .venv/bin/python benchmarks/bench_train.py [--backbone mobilenetv3_small_050] [--epochs 4]
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

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


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
    p.add_argument("--no-augment", dest="augment", action="store_false", help="skip the tensor augmentation")
    p.add_argument("--bare-runs", type=int, default=2,
                   help="bare-loop runs, split before/after the Ray run (default 2; 1 = before only)")
    return p.parse_args()


def machine() -> str:
    try:
        psi = Path("/proc/pressure/cpu").read_text().split()[1].replace("avg10=", "") + "% (avg10)"
    except (OSError, IndexError):
        psi = "n/a"
    return f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, cpu pressure {psi}"


def bare_loop(data: dict, cfg, epochs_log: list[dict]) -> float:
    """train_loop's own epoch function (training.train_epoch), world size 1, no Ray; appends one
    {epoch, images_per_s, ...} per epoch."""
    import numpy as np
    import torch

    from cxr_ray import models, training

    device = torch.device("cpu")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    images, labels, train_rows = data["images"], data["labels"], data["train"]
    norm = models.normalization(cfg.backbone)
    model = models.build_model(cfg.backbone, head=cfg.head, hidden=cfg.hidden, dropout=cfg.dropout,
                               pretrained=cfg.pretrained, image_size=cfg.image_size)
    optimizer = training.make_optimizer(model, cfg)
    steps_per_epoch = len(training.epoch_batches(train_rows, labels, cfg, 0, 0, 1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: training.lr_factor(s, cfg, steps_per_epoch))
    y_train = labels[train_rows]
    n_pos, n_neg = int(y_train.sum()), int(len(y_train) - y_train.sum())
    class_weight = (len(y_train) / (2 * max(n_neg, 1)), len(y_train) / (2 * max(n_pos, 1)))
    t_all = time.perf_counter()
    for epoch in range(cfg.epochs):
        loss_sum, seen, wait, train_time = training.train_epoch(
            model, model, optimizer, scheduler, images, labels, train_rows, class_weight, norm, cfg, epoch, 0, 1,
            device)
        epochs_log.append({"epoch": epoch + 1, "images_per_s": seen / max(train_time, 1e-9),
                           "data_wait_fraction": wait / max(train_time, 1e-9), "train_time_s": train_time,
                           "train_loss": loss_sum / max(seen, 1)})
    return time.perf_counter() - t_all


def steady(log: list[dict], key: str) -> list[float]:
    """Values of ``key`` for epochs 2..E (epoch 1 is warm-up)."""
    return [m[key] for m in log if m["epoch"] >= 2]


def fmt(values: list[float], unit: str, scale: float = 1.0, digits: int = 1) -> str:
    v = [x * scale for x in values]
    return (f"{statistics.median(v):8.{digits}f} {unit}  (median of {len(v)} epochs; "
            f"min {min(v):.{digits}f}, max {max(v):.{digits}f})")


def main() -> int:
    args = parse_args()
    if not DATA.is_dir():
        print(f"bench_train: the shared data folder {DATA} is absent (see the project README); "
              "this benchmark runs only beside it. Skipped: nothing measured.", file=sys.stderr)
        return 0
    if args.epochs < 2:
        print("bench_train: --epochs must be >= 2 (epoch 1 is warm-up)", file=sys.stderr)
        return 2

    import ray
    import ray.train

    from cxr_ray import config, data, runtime, training

    class JsonlLog(ray.train.UserCallback):
        """Runs in the Train controller: appends rank 0's report of each epoch to ``path``."""

        def __init__(self, path: str):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            keep = ("epoch", "images_per_s", "data_wait_fraction", "train_time_s", "epoch_time_s", "train_loss")
            with open(self.path, "a") as f:
                f.write(json.dumps({k: m[k] for k in keep}) + "\n")

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
        n_train = len(prepared.rows["train"])
        print(f"  data: {n_train} train / {len(prepared.rows['val'])} val images "
              f"({len(training.epoch_batches(prepared.rows['train'], prepared.cache.index['label'].to_numpy(), cfg, 0, 0, 1))}"
              f" steps an epoch), prepared in {time.perf_counter() - t:.1f} s", flush=True)

        runtime.connect(num_cpus=2, quiet=True)
        try:
            data_ref = runtime.put_data(prepared)
            shared = ray.get(data_ref)  # the very arrays the Ray worker reads (zero-copy from the store)
            bare_logs: list[list[dict]] = []
            bare_walls: list[float] = []

            def run_bare(tag: str) -> None:
                log: list[dict] = []
                wall = bare_loop(shared, cfg, log)
                bare_logs.append(log)
                bare_walls.append(wall)
                print(f"  bare ({tag}): " + "  ".join(f"e{m['epoch']} {m['images_per_s']:.0f}" for m in log)
                      + f" img/s; {wall:.1f} s for {cfg.epochs} epochs; {machine()}", flush=True)

            before = max(1, (args.bare_runs + 1) // 2)
            for _ in range(before):
                run_bare("before Ray")

            jsonl = tmp / "ray_epochs.jsonl"  # absolute: Train workers and controller chdir elsewhere
            t = time.perf_counter()
            training.fit(cfg, data_ref, name="bench_train", storage_path=str(tmp / "ray_runs"), workers=1,
                         cpus_per_worker=args.threads, max_failures=0, callbacks=[JsonlLog(str(jsonl))])
            ray_wall = time.perf_counter() - t
            ray_log = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
            if len(ray_log) != cfg.epochs:
                print(f"bench_train: expected {cfg.epochs} epoch reports from Ray Train, got {len(ray_log)}",
                      file=sys.stderr)
                return 1
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
    # the Ray worker repeats the bare loop's arithmetic: same seed, same batches -> same loss
    loss_gap = abs(ray_log[-1]["train_loss"] - bare_logs[0][-1]["train_loss"])
    print()
    print(f"Ray Train images/s (1 worker)   {fmt(ray_ips, 'images/s')}")
    print(f"bare loop images/s              {fmt(bare_ips, 'images/s')}")
    print(f"ratio Ray / bare                {r / b:8.3f}   (target >= 0.95)")
    print(f"Ray data-wait fraction          {fmt(ray_wait, '%', 100, 2)}   (target < 5%)")
    print(f"bare data-wait fraction         {fmt(bare_wait, '%', 100, 2)}")
    epoch_extra = [m["epoch_time_s"] - m["train_time_s"] for m in ray_log]
    startup = ray_wall - sum(m["epoch_time_s"] for m in ray_log)
    print(f"wall: fit() {ray_wall:.1f} s vs bare loop {statistics.median(bare_walls):.1f} s for {cfg.epochs} epochs; "
          f"fit = {sum(m['train_time_s'] for m in ray_log):.1f} s training steps + "
          f"{sum(epoch_extra):.1f} s validation/report/checkpoint ({statistics.median(epoch_extra):.2f} s an epoch) + "
          f"{startup:.1f} s Ray Train start-up and shutdown")
    print(f"last-epoch train_loss: ray {ray_log[-1]['train_loss']:.5f}, bare {bare_logs[0][-1]['train_loss']:.5f} "
          f"(|diff| {loss_gap:.1e}: same work on both sides)")
    print(f"end: {machine()}  (other work on the machine lowers every figure; compare rows of one run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
