"""Fine-tuning one configuration: one per-worker loop, and two places to run it.

``train_loop`` is the whole training of a run. Every worker holds the decoded cache (shared
zero-copy through Ray's object store), draws its shard of a seeded per-epoch permutation,
augments on tensors (on the GPU when there is one) and steps the model. Once per epoch all
workers score the full validation split (each a slice, then gathered) and rank 0 RECORDS the
epoch before anyone reports it: its row in ``RUN/metrics.csv``, then its checkpoint
``RUN/checkpoint_<epoch>/`` (weights as safetensors, optimiser state loadable with
``weights_only``, metadata as JSON). A scheduler that stops the run on hearing the report can
therefore never lose the epoch. On (re)start the loop resumes from the newest complete
checkpoint in its run directory, whoever restarted it.

Where the loop runs is a thin adapter (rank, world size, device, model wrapping, report):
  ``TrainWorld``  a Ray Train worker: ``fit()`` runs a TorchTrainer, DDP over N workers
                  (``cxr-ray train`` and study trials with several workers);
  ``TuneWorld``   the Tune trial process itself: ``run_in_trial()``, for single-worker study
                  trials, which then pay no Ray Train start-up (see study.py);
  ``LocalWorld``  this process, no Ray (benchmarks and tests).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import queue
import re
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from . import metrics, models, runtime, storage
from .config import SELECTION_METRICS, ConfigError, TrainConfig
from .errors import CxrError


class TrainError(CxrError, RuntimeError):
    """A training run failed; the message says where its logs are."""

# ----------------------------------------------------------------------------- batches

def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=gen, device=gen.device) * (hi - lo) + lo).to(device)


def _log_uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.exp(_uniform(n, math.log(lo), math.log(hi), gen, device))


def augment_mild(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild augmentation of a normalised batch: small rotation, zoom and shift, and exposure."""
    n, dev = x.shape[0], x.device
    angle, scale = _uniform(n, -0.12, 0.12, gen, dev), _uniform(n, 0.9, 1.1, gen, dev)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift_x, shift_y = _uniform(n, -0.06, 0.06, gen, dev), _uniform(n, -0.06, 0.06, gen, dev)
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x * _uniform(n, 0.85, 1.15, gen, dev).view(n, 1, 1, 1) + _uniform(n, -0.15, 0.15, gen, dev).view(n, 1, 1, 1)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A separable Gaussian blur of each image of ``x`` (N,1,H,W) with its own ``sigma`` (px)."""
    n, _, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).view(n, 1, 1, -1)
    y = F.conv2d(F.pad(x.view(1, n, h, w), (radius, radius, 0, 0), mode="replicate"), kernel, groups=n)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), kernel.transpose(2, 3), groups=n)
    return y.view(n, 1, h, w)


def augment_strong(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Strong radiograph-safe augmentation of a batch in 0..1 (returns 0..1).

    Geometry: a random resized crop of 65-100% of the area whose width/height ratio is jittered
    log-uniformly in 0.6-1.67 (films reach us squashed to a square by different amounts, and how much
    must not be a cue), rotated by up to 10 degrees, anywhere in the image. Photometric: gamma
    0.7-1.4, contrast 0.75-1.33 about the image mean, brightness +-0.1, then with probability 0.25
    each a Gaussian blur (sigma 0.3-1.2 px at 64 px, scaled with the size) and Gaussian noise (std
    up to 0.04). No horizontal flip: the heart is on the left in a frontal film.
    """
    n, _, h, _ = x.shape
    dev = x.device
    area, ratio = _uniform(n, 0.65, 1.0, gen, dev), _log_uniform(n, 0.6, 1 / 0.6, gen, dev)
    fw, fh = torch.sqrt(area * ratio).clamp(max=1.0), torch.sqrt(area / ratio).clamp(max=1.0)
    angle = _uniform(n, -math.pi / 18, math.pi / 18, gen, dev)
    tx, ty = _uniform(n, -1, 1, gen, dev) * (1 - fw), _uniform(n, -1, 1, gen, dev) * (1 - fh)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([fw * cos, -fh * sin, tx], 1), torch.stack([fw * sin, fh * cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    x = x.clamp(1e-6, 1) ** _log_uniform(n, 0.7, 1.4, gen, dev).view(n, 1, 1, 1)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * _log_uniform(n, 0.75, 1.33, gen, dev).view(n, 1, 1, 1) + mean \
        + _uniform(n, -0.1, 0.1, gen, dev).view(n, 1, 1, 1)
    blur = _uniform(n, 0, 1, gen, dev) < 0.25
    sigma = _uniform(n, 0.3, 1.2, gen, dev) * (h / 64)
    if blur.any():
        x = torch.where(blur.view(n, 1, 1, 1), _blur(x, sigma.clamp(min=1e-3)), x)
    noisy = (_uniform(n, 0, 1, gen, dev) < 0.25).float().view(n, 1, 1, 1)
    noise = torch.randn(x.shape, generator=gen, device=gen.device).to(dev)
    x = x + noisy * _uniform(n, 0, 0.04, gen, dev).view(n, 1, 1, 1) * noise
    return x.clamp(0, 1)


def model_input(x: torch.Tensor, norm: tuple[float, float], cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """A batch of cached uint8 pixels as the model trains on it: augmented per ``cfg.augment``,
    normalised as the checkpoint says (what evaluation and serving apply, without the augmentation)."""
    if cfg.augment == "strong":
        return (augment_strong(x.float() / 255.0, gen) - norm[0]) / norm[1]
    x = models.normalize(x, norm)
    return augment_mild(x, gen) if cfg.augment == "mild" else x


class ModelEMA:
    """An exponential moving average of a model's weights (BatchNorm statistics averaged alike),
    the model that is validated, checkpointed and served when ``ema_decay`` > 0. The decay ramps
    up as min(decay, (1 + t) / (10 + t)) so the first steps do not freeze the initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(current[name].detach(), alpha=1 - d)
            else:  # BatchNorm's step counter
                value.copy_(current[name])


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
    """This rank's batches for ``epoch``: a seeded global order, cut into equal shards. A last batch
    of a single image is dropped: BatchNorm cannot train on one."""
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
    return [shard[i:i + per_batch] for i in range(0, len(shard), per_batch) if len(shard[i:i + per_batch]) > 1]


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
    """Loss, AUROC, and accuracy/sensitivity/specificity/F1 at 0.5 and at the Youden-J threshold;
    NaN throughout when the outputs are not finite (a diverged run has nothing to score)."""
    finite = bool(np.isfinite(p).all())
    eps = 1e-7
    out = {f"{prefix}_loss": float(F.binary_cross_entropy(torch.from_numpy(p).clamp(eps, 1 - eps),
                                                            torch.from_numpy(y.astype(np.float32))))
           if finite else math.nan,
           f"{prefix}_auroc": metrics.auroc(y, p) if finite else math.nan}
    threshold = metrics.youden_threshold(y, p) if finite else math.nan
    for tag, t in (("", 0.5), ("_youden", threshold)):
        c = metrics.confusion(y, p, t) if finite else {}
        for k in ("accuracy", "sensitivity", "specificity", "f1"):
            out[f"{prefix}_{k}{tag}"] = c.get(k, math.nan)
    out["threshold"] = threshold
    return out


# ----------------------------------------------------------------------------- the record of a run

CHECKPOINT = re.compile(r"^checkpoint_(\d{6})$")


def checkpoint_uri(run_dir: str, epoch: int) -> str:
    return storage.join(run_dir, f"checkpoint_{epoch:06d}")


def checkpoints(run_dir: str) -> dict[int, str]:
    """Epoch -> URI of every complete checkpoint of a run (``meta.json`` is written last)."""
    found = {}
    for name in storage.listdir(run_dir):
        m = CHECKPOINT.match(name)
        if m and storage.exists(storage.join(run_dir, name, "meta.json")):
            found[int(m.group(1))] = storage.join(run_dir, name)
    return found


def write_history_row(run_dir: str, row: dict) -> None:
    """Put one epoch's row into the run's ``metrics.csv``: earlier epochs are kept, the same or
    later ones replaced, so every epoch appears once whoever (re)trained it."""
    uri = storage.join(run_dir, "metrics.csv")
    new = pd.DataFrame([row])
    if storage.exists(uri):
        history = storage.read_csv(uri)
        new = pd.concat([history[history["epoch"] < row["epoch"]], new], ignore_index=True)
    storage.write_csv(uri, new)


def record_epoch(run_dir: str, report: dict, model, optimizer, scheduler, cfg: TrainConfig, norm,
                 arrays: dict[str, np.ndarray], keep: int, train_state: dict | None = None) -> str:
    """Rank 0: the epoch's history row, then its checkpoint, then drop checkpoints beyond the
    newest ``keep`` (0 keeps all). Returns the checkpoint's URI."""
    uri = checkpoint_uri(run_dir, report["epoch"])
    write_history_row(run_dir, report | {"checkpoint": uri})
    with tempfile.TemporaryDirectory() as tmp:
        models.save_checkpoint(Path(tmp), model, optimizer, scheduler, report["epoch"], cfg, norm, report, train_state)
        for name, values in arrays.items():
            np.save(Path(tmp) / f"{name}.npy", values)
        storage.upload_dir(tmp, uri, last="meta.json")
    if keep:
        for epoch in sorted(checkpoints(run_dir))[:-keep]:
            storage.delete_dir(checkpoint_uri(run_dir, epoch))
    return uri


# ----------------------------------------------------------------------------- where the loop runs

class LocalWorld:
    """This process, one worker, no Ray: ``reports`` collects what the loop reports."""

    engine, rank, size = "local", 0, 1

    def __init__(self, name: str = "local", label: str = ""):
        self.name, self.label, self.reports = name, label or name, []
        self.device = models.local_device()

    def wrap(self, model, find_unused: bool):
        return model.to(self.device)

    def report(self, metrics: dict, checkpoint: str | None = None) -> None:
        self.reports.append(metrics)


class TuneWorld(LocalWorld):
    """The Tune trial process: the trial's own resources, reports go straight to Tune."""

    engine = "tune"

    def __init__(self):
        from ray import tune
        super().__init__(tune.get_context().get_trial_id(), tune.get_context().get_trial_name())
        self._report = tune.report

    def report(self, metrics: dict, checkpoint: str | None = None) -> None:
        self._report(metrics)  # the checkpoint's URI is in the metrics; the loop finds its own on restart


class TrainWorld:
    """A Ray Train worker: rank and world size from Train, DDP when there are several."""

    engine = "train"

    def __init__(self):
        import ray.train
        import ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.size, self.name = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_experiment_name()
        self.label = self.name
        self.device = ray.train.torch.get_device()
        self._train = ray.train

    def wrap(self, model, find_unused: bool):
        if self.size == 1:
            return model.to(self.device)
        import ray.train.torch
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": find_unused})

    def report(self, metrics: dict, checkpoint: str | None = None) -> None:
        """A barrier: every rank reports every epoch. Rank 0's checkpoint is already in the run
        directory, so Train registers it without copying (its Result and dashboard show it)."""
        ckpt = self._train.Checkpoint(checkpoint) if checkpoint else None
        self._train.report(metrics, checkpoint=ckpt, checkpoint_upload_mode=self._train.CheckpointUploadMode.NO_UPLOAD)


# ----------------------------------------------------------------------------- gauges

_GAUGES: dict = {}


def export_gauges(cfg: TrainConfig, trial: str, report: dict) -> None:
    """Prometheus gauges through Ray's metrics agent (the dashboard's Grafana panels, any scraper):
    throughput, epoch and each selectable validation metric of a run, tagged study/arm/trial."""
    from ray.util.metrics import Gauge
    if not _GAUGES:
        tags = ("study", "arm", "trial")
        _GAUGES["images_per_second"] = Gauge("cxr_ray_train_images_per_second",
                                             "Training images per second of a run", tag_keys=tags)
        _GAUGES["epoch"] = Gauge("cxr_ray_trial_epoch", "Last epoch a run finished", tag_keys=tags)
        _GAUGES["metric"] = Gauge("cxr_ray_trial_metric", "A validation metric of a run at its last epoch",
                                  tag_keys=tags + ("metric",))
    tags = {"study": cfg.study or "-", "arm": cfg.arm or cfg.backbone, "trial": trial}
    _GAUGES["images_per_second"].set(report["images_per_s"], tags=tags)
    _GAUGES["epoch"].set(report["epoch"], tags=tags)
    for name in SELECTION_METRICS:
        _GAUGES["metric"].set(report[name], tags=tags | {"metric": name})


# ----------------------------------------------------------------------------- the loop

def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """One distinct 63-bit seed per (seed, epoch, rank): no two runs, epochs or ranks share a stream."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def train_epoch(net, model, optimizer, scheduler, images, labels, train_rows, class_weight, norm, cfg: TrainConfig,
                epoch: int, rank: int, world: int, device: torch.device,
                ema: ModelEMA | None = None) -> tuple[float, int, float, float]:
    """One epoch of this rank's shard: (loss sum, images seen, seconds waiting for data, seconds).

    Every random stream (order, augmentation, dropout) is seeded from (seed, epoch, rank), so a run
    resumed from a checkpoint continues exactly as the uninterrupted run would have.
    """
    cuda = device.type == "cuda"
    model.frozen_backbone = epoch < cfg.freeze_epochs
    net.train()
    torch.manual_seed(epoch_seed(cfg.seed, epoch, rank))
    gen = torch.Generator(device=device)
    gen.manual_seed(epoch_seed(cfg.seed, epoch, rank))
    weights = torch.tensor(class_weight, device=device)
    loss_sum, seen, wait = torch.zeros((), device=device), 0, 0.0
    start = t_ready = time.perf_counter()
    for x, y in Prefetcher(images, labels, epoch_batches(train_rows, labels, cfg, epoch, rank, world), pin=cuda):
        wait += time.perf_counter() - t_ready
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = model_input(x, norm, cfg, gen)
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
        if ema:
            ema.update(model)
        loss_sum += loss.detach() * len(y)
        seen += len(y)
        t_ready = time.perf_counter()
    return loss_sum.item(), seen, wait, time.perf_counter() - start


def train_loop(cfg: TrainConfig, data: dict, run_dir: str, world, keep_checkpoints: int = 2) -> None:
    """Train ``cfg`` on ``data`` (images, labels, split rows) in ``world``; see the module docstring."""
    rank, size, device = world.rank, world.size, world.device
    if cfg.batch_size % size:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {size} workers")
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
    net = world.wrap(model, find_unused=cfg.freeze_epochs > 0)
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay else None
    scored = ema.module if ema else model  # what is validated, checkpointed and served
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = len(epoch_batches(train_rows, labels, cfg, 0, rank, size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, steps_per_epoch))

    start_epoch = 0
    saved = checkpoints(run_dir)
    if saved:
        start_epoch = max(saved)
        with tempfile.TemporaryDirectory() as tmp:
            d = storage.local_dir(saved[start_epoch], cache=tmp)
            state = torch.load(os.path.join(d, "train_state.pt"), weights_only=True)
            scored.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
            if ema:  # the checkpoint serves the average; the raw weights it averages train on
                model.load_state_dict(state["model"])
                ema.updates = state["ema_updates"]
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            last = storage.read_json(os.path.join(d, "meta.json"))["metrics"]
        # Say the last recorded epoch again before training on: whoever waited for it (a Tune trial,
        # its scheduler) may have died before hearing it, and may have decided to stop this run on it
        # (ASHA's decisions outlive the driver). Nothing is trained or written for it.
        world.report(last | {"started_at_epoch": start_epoch}, saved[start_epoch] if rank == 0 else None)
        if start_epoch >= cfg.epochs or last.get("diverged"):
            return

    y_train = labels[train_rows]
    n_pos, n_neg = int(y_train.sum()), int(len(y_train) - y_train.sum())
    class_weight = (len(y_train) / (2 * max(n_neg, 1)), len(y_train) / (2 * max(n_pos, 1)))
    val_y = labels[val_rows]
    where = {"engine": world.engine, "node_id": "", "pid": os.getpid()}
    if ray.is_initialized():
        where["node_id"] = ray.get_runtime_context().get_node_id()

    for epoch in range(start_epoch, cfg.epochs):
        start = time.perf_counter()
        loss_sum, seen, wait, train_time = train_epoch(net, model, optimizer, scheduler, images, labels,
                                                       train_rows, class_weight, norm, cfg, epoch, rank, size,
                                                       device, ema)

        # Validation on the full split, gathered so every rank reports identical numbers. Each rank's
        # BatchNorm statistics drifted on its own last batches: score with rank 0's, the checkpointed model.
        if dist.is_initialized() and size > 1:
            for buffer in scored.buffers():
                dist.broadcast(buffer, src=0)
        p_val = predict_distributed(scored, images, val_rows, norm, device, rank, size, cuda)
        stats = torch.tensor([loss_sum, seen, wait, train_time], device=device, dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(stats)
        loss_total, seen_total, wait_total, time_total = stats.tolist()
        # Weights gone to inf/NaN (a learning rate far too high) give non-finite outputs: the epoch is
        # recorded as diverged and the run ends there, rather than crashing the trial.
        diverged = not (np.isfinite(p_val).all() and math.isfinite(loss_total))
        report = {
            "epoch": epoch + 1,
            "train_loss": loss_total / max(seen_total, 1),
            **epoch_metrics(val_y, p_val),
            "diverged": diverged,
            "images_per_s": seen_total / max(time_total / size, 1e-9),
            "data_wait_fraction": wait_total / max(time_total, 1e-9),
            "train_time_s": time_total / size,
            "lr": optimizer.param_groups[0]["lr"],
            "frozen_backbone": model.frozen_backbone,
            "started_at_epoch": start_epoch,  # 0 for a fresh run, k when resumed from epoch k's checkpoint
            **where,
        }
        arrays = {"val_probabilities": p_val}
        if epoch + 1 == cfg.epochs and cfg.evaluate_test and not diverged:  # a final run: scored on test and external sets now
            arrays["test_probabilities"] = predict_distributed(scored, images, data["test"], norm, device, rank,
                                                               size, cuda)
            for name, ext_images in data.get("external", {}).items():
                arrays[f"external_{name}_probabilities"] = predict_distributed(
                    scored, ext_images, np.arange(len(ext_images)), norm, device, rank, size, cuda)
        report["epoch_time_s"] = time.perf_counter() - start  # training and validation
        report["finished_at"] = time.time()
        checkpoint = None
        if rank == 0:
            train_state = {"model": model.state_dict(), "ema_updates": ema.updates} if ema else {}
            checkpoint = record_epoch(run_dir, report, scored, optimizer, scheduler, cfg, norm, arrays,
                                      keep_checkpoints, train_state)
            report["checkpoint_path"] = checkpoint
            # The process's own log (the dashboard's Actors view), not the console: the driver prints that.
            print(f"[{world.label}] epoch {epoch + 1}/{cfg.epochs}  train_loss {report['train_loss']:.4f}  "
                  f"val_auroc {report['val_auroc']:.4f}  -> {checkpoint}", flush=True)
            if ray.is_initialized():
                export_gauges(cfg, world.name, report)
        world.report(report, checkpoint)
        if diverged:
            return


def run_in_trial(cfg: TrainConfig, data_ref, run_dir: str, keep_checkpoints: int = 2) -> None:
    """The loop inside the calling Tune trial (single worker, no Ray Train)."""
    train_loop(cfg, runtime.fetch_data(data_ref), run_dir, TuneWorld(), keep_checkpoints)


# ----------------------------------------------------------------------------- Ray Train

def ray_train_worker(config: dict) -> None:
    """Ray Train per-worker entry point. ``config``: TrainConfig fields + ``data``, ``run_dir``, ``keep``."""
    logging.getLogger().setLevel(logging.WARNING)  # Train logs every report at INFO
    data = runtime.fetch_data(config["data"][0])  # [ObjectRef]: wrapped so Ray passes the reference, not the arrays
    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k not in ("data", "run_dir", "keep")})
    train_loop(cfg, data, config["run_dir"], TrainWorld(), config["keep"])


def fit(cfg: TrainConfig, data_ref, *, name: str, storage_path: str, workers: int = 1, use_gpu: bool = False,
        cpus_per_worker: float = 1, gpus_per_worker: float = 1, custom_resources: dict | None = None,
        max_failures: int = 2, callbacks: list | None = None, keep_checkpoints: int = 2):
    """Run one configuration with Ray Train in ``storage_path/name``. Re-running the same ``name``
    resumes it; crashed workers are restarted from the last checkpoint (``FailureConfig``)."""
    import ray.train
    import ray.train.torch
    config = {**dataclasses.asdict(cfg), "data": [data_ref], "run_dir": storage.join(storage_path, name),
              "keep": keep_checkpoints}
    if not cfg.threads:
        config["threads"] = max(1, int(cpus_per_worker))
    resources = {"CPU": cpus_per_worker} | ({"GPU": gpus_per_worker} if use_gpu else {}) | (custom_resources or {})
    trainer = ray.train.torch.TorchTrainer(
        ray_train_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=callbacks or [],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    return trainer.fit()
