"""Fine-tuning one configuration: the per-worker loop (Ray Train, DDP) and its launcher.

Every worker holds the decoded cache (shared zero-copy through Ray's object store), draws
its shard of a seeded per-epoch permutation, augments on tensors (on the GPU when there is
one) and steps a DDP model. Once per epoch all workers score the full validation split
(each a slice, then gathered), report the same metrics, and rank 0 writes a checkpoint:
weights (safetensors), optimiser/scheduler state (weights_only-safe) and metadata (JSON).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from . import metrics, models
from .config import ConfigError, TrainConfig

# ----------------------------------------------------------------------------- batches

def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild radiograph-safe augmentation on a normalised batch: affine jitter and exposure.

    No horizontal flips: the heart is on the left in a frontal film.
    """
    n = x.shape[0]

    def u(lo, hi):
        return torch.rand(n, generator=gen, device=gen.device).to(x.device) * (hi - lo) + lo

    angle, scale = u(-0.12, 0.12), u(0.9, 1.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, u(-0.06, 0.06)], 1), torch.stack([sin, cos, u(-0.06, 0.06)], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x * u(0.85, 1.15).view(n, 1, 1, 1) + u(-0.15, 0.15).view(n, 1, 1, 1)


class Prefetcher:
    """Assembles batches of cached pixels in a background thread, so the step never waits
    on host-side indexing (and copies to pinned memory for an asynchronous GPU transfer)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batches: list[np.ndarray], pin: bool):
        self.queue: queue.Queue = queue.Queue(maxsize=3)
        self.thread = threading.Thread(target=self._fill, args=(images, labels, batches, pin), daemon=True)
        self.thread.start()

    def _fill(self, images, labels, batches, pin):
        for rows in batches:
            rows = np.sort(rows)
            x = torch.from_numpy(images[rows]).unsqueeze(1)
            y = torch.from_numpy(labels[rows].astype(np.float32))
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            self.queue.put((x, y))
        self.queue.put(None)

    def __iter__(self):
        while (item := self.queue.get()) is not None:
            yield item


def epoch_batches(train_rows: np.ndarray, labels: np.ndarray, cfg: TrainConfig, epoch: int, rank: int,
                  world: int) -> list[np.ndarray]:
    """This rank's batches for ``epoch``: a seeded global order, cut into equal shards."""
    rng = np.random.default_rng([cfg.seed, epoch])
    if cfg.imbalance == "sampler":  # class-balanced sampling with replacement
        y = labels[train_rows]
        w = np.where(y == 1, 0.5 / max(y.sum(), 1), 0.5 / max((1 - y).sum(), 1))
        order = rng.choice(train_rows, size=len(train_rows), replace=True, p=w / w.sum())
    else:
        order = rng.permutation(train_rows)
    per_rank = len(order) // world
    shard = order[rank * per_rank:(rank + 1) * per_rank]
    per_batch = cfg.batch_size // world
    return [shard[i:i + per_batch] for i in range(0, len(shard), per_batch) if len(shard[i:i + per_batch])]


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    if cfg.optimizer == "adam":  # Adam's decay is L2 in the gradient, as in Keras / the seed
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


# ----------------------------------------------------------------------------- evaluation

def predict_distributed(model, images, rows, norm, device, rank, world, amp) -> np.ndarray:
    """Score all ``rows`` with each rank taking a slice, then gather: every rank gets all."""
    mine = np.arange(rank, len(rows), world)
    probs = models.predict(model, images, rows[mine], norm, device, amp=amp)
    if world == 1:
        return probs
    parts: list = [None] * world
    dist.all_gather_object(parts, (mine, probs))
    full = np.empty(len(rows), dtype=np.float32)
    for idx, p in parts:
        full[idx] = p
    return full


def epoch_metrics(y: np.ndarray, p: np.ndarray, prefix: str = "val") -> dict:
    """AUROC, and accuracy/sensitivity/specificity/F1 at 0.5 and at the Youden-J threshold."""
    out = {f"{prefix}_auroc": metrics.auroc(y, p)}
    threshold = metrics.youden_threshold(y, p)
    for tag, t in (("", 0.5), ("_youden", threshold)):
        c = metrics.confusion(y, p, t)
        for k in ("accuracy", "sensitivity", "specificity", "f1"):
            out[f"{prefix}_{k}{tag}"] = c[k]
    out["threshold"] = threshold
    return out


# ----------------------------------------------------------------------------- the loop

def train_epoch(net, model, optimizer, scheduler, images, labels, train_rows, class_weight, norm, cfg: TrainConfig,
                epoch: int, rank: int, world: int, device: torch.device) -> tuple[float, int, float, float]:
    """One epoch of this rank's shard: (loss sum, images seen, seconds waiting for data, seconds).

    Every random stream (order, augmentation, dropout) is seeded from (seed, epoch, rank), so a run
    resumed from a checkpoint continues exactly as the uninterrupted run would have.
    """
    cuda = device.type == "cuda"
    model.frozen_backbone = epoch < cfg.freeze_epochs
    net.train()
    torch.manual_seed(cfg.seed * 1000 + epoch * 10 + rank)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed * 1000 + epoch * 10 + rank)
    weights = torch.tensor(class_weight, device=device)
    loss_sum, seen, wait = torch.zeros((), device=device), 0, 0.0
    start = t_ready = time.perf_counter()
    for x, y in Prefetcher(images, labels, epoch_batches(train_rows, labels, cfg, epoch, rank, world), pin=cuda):
        wait += time.perf_counter() - t_ready
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = models.normalize(x, norm)
        if cfg.augment:
            x = augment(x, gen)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = net(x).float()
        weight = weights[y.long()] if cfg.imbalance == "weighted_loss" else None
        loss = F.binary_cross_entropy_with_logits(logits, y, weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(y)
        seen += len(y)
        t_ready = time.perf_counter()
    return loss_sum.item(), seen, wait, time.perf_counter() - start


def train_loop(config: dict) -> None:
    """Ray Train per-worker entry point. ``config``: TrainConfig fields + ``data``."""
    logging.getLogger().setLevel(logging.WARNING)  # Train logs every report at INFO; EpochLog prints one line
    data = config["data"]
    if isinstance(data, list):  # [ObjectRef]: wrapped so Ray passes the reference, not the arrays
        data = ray.get(data[0])
    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k != "data"})
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {world} workers")
    device = ray.train.torch.get_device() if world > 1 or dist.is_initialized() else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    np.random.seed(cfg.seed)

    images, labels = data["images"], data["labels"]
    train_rows, val_rows = data["train"], data["val"]
    norm = models.normalization(cfg.backbone)

    model = models.build_model(cfg.backbone, head=cfg.head, hidden=cfg.hidden, dropout=cfg.dropout,
                               pretrained=cfg.pretrained, image_size=cfg.image_size)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if world > 1 or dist.is_initialized():
        net = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": cfg.freeze_epochs > 0})
    else:
        net = model.to(device)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = len(epoch_batches(train_rows, labels, cfg, 0, rank, world))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, steps_per_epoch))

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
            state = torch.load(os.path.join(d, "train_state.pt"), weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = state["epoch"]
            if start_epoch >= cfg.epochs:
                # Finished, but whoever waited for it (a Tune trial) died before hearing so: say it again,
                # without a new checkpoint (the reported one is kept; nothing done is changed).
                last = json.loads(Path(d, "meta.json").read_text())["metrics"]
                ray.train.report(last | {"started_at_epoch": start_epoch})
                return

    y_train = labels[train_rows]
    n_pos, n_neg = int(y_train.sum()), int(len(y_train) - y_train.sum())
    class_weight = (len(y_train) / (2 * max(n_neg, 1)), len(y_train) / (2 * max(n_pos, 1)))
    val_y = labels[val_rows]
    throughput = None
    if rank == 0 and ray.is_initialized():  # Prometheus, via Ray's metrics agent (dashboard/Grafana)
        from ray.util.metrics import Gauge
        throughput = Gauge("cxr_ray_train_images_per_second", "Training images per second of a run",
                           tag_keys=("study", "arm", "trial"))
        throughput.set_default_tags({"study": cfg.study or "-", "arm": cfg.arm or cfg.backbone,
                                     "trial": ctx.get_experiment_name()})

    for epoch in range(start_epoch, cfg.epochs):
        start = time.perf_counter()
        loss_sum, seen, wait, train_time = train_epoch(net, model, optimizer, scheduler, images, labels,
                                                       train_rows, class_weight, norm, cfg, epoch, rank, world,
                                                       device)

        # Validation on the full split, gathered so every rank reports identical numbers. Each rank's
        # BatchNorm statistics drifted on its own last batches: score with rank 0's, the checkpointed model.
        if dist.is_initialized() and world > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        p_val = predict_distributed(model, images, val_rows, norm, device, rank, world, cuda)
        stats = torch.tensor([loss_sum, seen, wait, train_time], device=device, dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(stats)
        loss_total, seen_total, wait_total, time_total = stats.tolist()
        eps = 1e-7
        report = {
            "epoch": epoch + 1,
            "train_loss": loss_total / max(seen_total, 1),
            "val_loss": float(F.binary_cross_entropy(torch.from_numpy(p_val).clamp(eps, 1 - eps),
                                                     torch.from_numpy(val_y.astype(np.float32)))),
            **epoch_metrics(val_y, p_val),
            "images_per_s": seen_total / max(time_total / world, 1e-9),
            "data_wait_fraction": wait_total / max(time_total, 1e-9),
            "epoch_time_s": time.perf_counter() - start,
            "train_time_s": time_total / world,
            "lr": optimizer.param_groups[0]["lr"],
            "frozen_backbone": model.frozen_backbone,
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
            "started_at_epoch": start_epoch,  # 0 for a fresh run, k when resumed from epoch k's checkpoint
        }
        if throughput:
            throughput.set(report["images_per_s"])
        last = epoch + 1 == cfg.epochs
        p_test = None
        if last and cfg.evaluate_test:
            p_test = predict_distributed(model, images, data["test"], norm, device, rank, world, cuda)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                models.save_checkpoint(Path(tmp), model, optimizer, scheduler, epoch + 1, cfg, norm, report)
                np.save(Path(tmp) / "val_probabilities.npy", p_val)
                if p_test is not None:
                    np.save(Path(tmp) / "test_probabilities.npy", p_test)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(report, checkpoint=ckpt)


# ----------------------------------------------------------------------------- launcher

class EpochLog(ray.train.UserCallback):
    """Prints one line per epoch and keeps the run's per-epoch history as a CSV on its storage
    (local disk, NFS or object storage). Runs in the Train controller.

    The history survives restarts: a resumed run keeps the rows of the epochs before the one it
    resumed at and replaces any later ones, so every epoch appears once, whoever trained it.
    """

    def __init__(self, csv_uri: str | None = None, prefix: str = ""):
        self.csv_uri, self.prefix = csv_uri, prefix

    def after_report(self, run_context, metrics, checkpoint):
        import pandas as pd

        from . import storage
        m = metrics[0]
        if m.get("started_at_epoch", 0) >= m["epoch"]:  # a finished run's last epoch, reported again
            print(f"{self.prefix}epoch {m['epoch']:>3}  already trained (run finished before)", flush=True)
            return
        print(f"{self.prefix}epoch {m['epoch']:>3}  train_loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}  "
              f"val_auroc {m['val_auroc']:.4f}  val_acc@youden {m['val_accuracy_youden']:.4f}  "
              f"{m['images_per_s']:.0f} img/s  data_wait {100 * m['data_wait_fraction']:.1f}%", flush=True)
        if not self.csv_uri:
            return
        row = pd.DataFrame([{**m, "checkpoint": checkpoint.path if checkpoint else ""}])
        if storage.exists(self.csv_uri):
            history = storage.read_csv(self.csv_uri)
            row = pd.concat([history[history["epoch"] < m["epoch"]], row], ignore_index=True)
        storage.write_csv(self.csv_uri, row)


def fit(cfg: TrainConfig, data_ref, *, name: str, storage_path: str, workers: int = 1, use_gpu: bool = False,
        cpus_per_worker: float = 1, gpus_per_worker: float = 1, custom_resources: dict | None = None,
        max_failures: int = 2,
        callbacks: list | None = None, keep_checkpoints: int = 2, selection_metric: str = "val_auroc",
        selection_mode: str = "max"):
    """Run one configuration with Ray Train. Re-running the same ``name`` resumes it."""
    config = {**dataclasses.asdict(cfg), "data": [data_ref]}
    if not cfg.threads:
        config["threads"] = max(1, int(cpus_per_worker))
    resources = {"CPU": cpus_per_worker} | ({"GPU": gpus_per_worker} if use_gpu else {}) | (custom_resources or {})
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints,
                                                         checkpoint_score_attribute=selection_metric,
                                                         checkpoint_score_order=selection_mode),
            callbacks=callbacks or [],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our EpochLog says what matters
        ),
    )
    return trainer.fit()
