"""Recipe variants for studies/kaggle_cpu.yaml, judged on training data only.

Every variant is trained by the product's own loop (``training.train_loop`` in this process, one torch
thread) on the study's own split of the official TRAIN folder (``data.prepare``: validation and test
carved out by patient, seed 0), then scored on internal validation and on the shortcut-randomised
view of it (``cxr_ray.proxy``, view seeds 0-2 pooled): the view stands in for "collected apart", so
the shared external third is never spent on a choice. Each run appends its figures to
``OUT/runs.csv`` and its probabilities to ``OUT/preds/`` as soon as it ends, and a run killed part-way
resumes from its last epoch's checkpoint, so nothing is lost if the process stops.

    nice -n 15 .venv/bin/python benchmarks/recipe_proxy.py --out DIR cues          # each cue before/after the view
    nice -n 15 .venv/bin/python benchmarks/recipe_proxy.py --out DIR train [VARIANT ...]
    .venv/bin/python benchmarks/recipe_proxy.py --out DIR table                    # variants, ensembles, TTA
    .venv/bin/python benchmarks/recipe_proxy.py --out DIR thresholds               # threshold rules, cross-fitted
    .venv/bin/python benchmarks/recipe_proxy.py --out DIR check                    # ONCE, after choosing: test, shared third

Figures only: nothing here asserts. Timings are contended on a shared machine (``machine()`` says how).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from machine import machine

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "chest_xray_224"
EXTERNAL = ROOT.parent / "shared" / "data" / "chest_xray_224_external"
VIEW_SEEDS = (0, 1, 2)

# The shipped recipe (studies/kaggle_cpu.yaml's model block, resnet10t, the middle of its lr range);
# each variant changes what its name says.
BASE = dict(backbone="resnet10t", head="linear", imbalance="weighted_loss", augment="strong", ema_decay=0.995,
            lr=2e-3, weight_decay=1e-4, batch_size=64, epochs=10, image_size=64)
VARIANTS = {
    "shipped": ({}, (0, 1, 2)),
    "mild": ({"augment": "mild", "ema_decay": 0.0}, (0,)),  # the shortcut recipe: does the view catch it?
    "15ep": ({"epochs": 15}, (0, 1, 2)),
    "96px": ({"image_size": 96}, (0, 1, 2)),
}


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


# ----------------------------------------------------------------------------- data and scoring

def prepared(size: int):
    from cxr_ray import data
    return data.prepare("kaggle", str(DATA), size, None, val_fraction=0.15, test_fraction=0.15, seed=0,
                        progress=False)


def loop_data(prep) -> dict:
    """What ``train_loop`` takes (as ``runtime.put_data`` builds it for a study)."""
    return {"images": np.ascontiguousarray(prep.cache.images),
            "labels": prep.cache.index["label"].to_numpy(np.int8), **prep.rows}


# Test-time views: the film as is, squashed both ways (the cue the strong augmentation hides) and
# zoomed past its margins: (left, top, width, height) as fractions of the side.
TTA_BOXES = [(0, 0, 1, 1), (0.025, 0.104, 0.95, 0.792), (0.104, 0.025, 0.792, 0.95), (0.05, 0.05, 0.9, 0.9)]


def probabilities(model, norm, images: np.ndarray, tta: bool) -> np.ndarray:
    import torch

    from cxr_ray import models, proxy
    rows = np.arange(len(images))
    if not tta:
        return models.predict(model, images, rows, norm, torch.device("cpu"))
    n, size = len(images), images.shape[1]
    out = []
    for box in TTA_BOXES:
        left, top, width, height = (np.full(n, v * size) for v in box)
        x = np.round(proxy.crop_resize(images, left, top, width, height)).astype(np.uint8)
        out.append(models.predict(model, x, rows, norm, torch.device("cpu")))
    return np.mean(out, axis=0)


def score_sets(checkpoint: str, sets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Probabilities of a checkpoint on each named image set, plain and with TTA (``<name>_tta``)."""
    from cxr_ray import models
    model, meta = models.load_checkpoint(checkpoint)
    norm = (meta["mean"], meta["std"])
    out = {}
    for name, images in sets.items():
        out[name] = probabilities(model, norm, images, tta=False)
        out[f"{name}_tta"] = probabilities(model, norm, images, tta=True)
    return out


def proxy_views(images: np.ndarray) -> np.ndarray:
    """The view of ``images`` for each view seed, stacked: (len(VIEW_SEEDS) * N, S, S)."""
    from cxr_ray import proxy
    return np.concatenate([proxy.view(images, seed) for seed in VIEW_SEEDS])


def figures(y: np.ndarray, p: np.ndarray, p_proxy: np.ndarray, threshold: float) -> dict:
    """AUROC on validation and on its view (seeds pooled), and what the validation threshold gives on the view."""
    from cxr_ray import metrics
    y_proxy = np.tile(y, len(p_proxy) // len(y))
    c = metrics.confusion(y_proxy, p_proxy, threshold)
    return {"val_auroc": metrics.auroc(y, p), "proxy_auroc": metrics.auroc(y_proxy, p_proxy),
            "threshold": threshold, "proxy_accuracy": c["accuracy"], "proxy_sensitivity": c["sensitivity"],
            "proxy_specificity": c["specificity"]}


def append_row(path: Path, row: dict) -> None:
    pd.DataFrame([row]).to_csv(path, mode="a", header=not path.exists(), index=False)


# ----------------------------------------------------------------------------- commands

def _margin(x: np.ndarray) -> int:
    return max(1, round(0.08 * x.shape[1]))


# Image statistics that tell the classes apart in train without looking at the lungs (acquisition
# cues), and one that does look at them (the opacity of the central field, for contrast).
CUES = {
    "pixels above 0.9 (highlights)": lambda x: (x > 0.9).mean((1, 2)),
    "99th percentile": lambda x: np.percentile(x.reshape(len(x), -1), 99, axis=1),
    "1st percentile": lambda x: np.percentile(x.reshape(len(x), -1), 1, axis=1),
    "spread (std)": lambda x: x.std((1, 2)),
    "brightest pixel of the top-left corner (markers)": lambda x: x[:, :2 * _margin(x), :2 * _margin(x)].max((1, 2)),
    "lateral margins, mean": lambda x: (x[:, :, :_margin(x)].mean((1, 2)) + x[:, :, -_margin(x):].mean((1, 2))) / 2,
    "central field, mean (lung opacity: not a shortcut)": lambda x: x[:, x.shape[1] // 4:-(x.shape[1] // 4),
                                                                     x.shape[1] // 4:-(x.shape[1] // 4)].mean((1, 2)),
}


def cues(size: int) -> None:
    """How well each cue alone separates the classes (AUROC for PNEUMONIA) in the training pool
    (train + validation), on the films as cached and on their view (seed 0)."""
    from cxr_ray import metrics, proxy
    prep = prepared(size)
    rows = np.r_[prep.rows["train"], prep.rows["val"]]
    images, y = np.asarray(prep.cache.images[rows]), prep.cache.index["label"].to_numpy()[rows]
    before, after = images / 255.0, proxy.view(images, 0) / 255.0
    print(f"cues in the training pool ({len(rows)} films at {size} px): AUROC of the statistic alone, "
          f"as cached -> on the view")
    for name, statistic in CUES.items():
        print(f"  {name:<52} {metrics.auroc(y, statistic(before)):.3f} -> {metrics.auroc(y, statistic(after)):.3f}")


def train(out: Path, names: list[str]) -> None:
    import torch

    from cxr_ray import metrics, training
    from cxr_ray.config import TrainConfig
    torch.set_num_threads(1)
    (out / "preds").mkdir(parents=True, exist_ok=True)
    for variant in names or list(VARIANTS):
        overrides, seeds = VARIANTS[variant]
        values = BASE | overrides
        prep = prepared(values["image_size"])
        data = loop_data(prep)
        y_val = data["labels"][data["val"]].astype(int)
        val_images = data["images"][data["val"]]
        val_proxy = proxy_views(val_images)
        for seed in seeds:
            name = run_name(variant, seed)
            if (out / "preds" / f"{name}.npz").exists():
                continue
            cfg = TrainConfig(**values, seed=seed, threads=1)
            run_dir = str(out / "runs" / name)
            print(f"{name}: training ({machine()})", flush=True)
            start = time.perf_counter()
            training.train_loop(cfg, data, run_dir, training.LocalWorld(name), keep_checkpoints=1)
            wall = time.perf_counter() - start
            epochs = pd.read_csv(Path(run_dir) / "metrics.csv")
            last = training.checkpoints(run_dir)[cfg.epochs]
            probs = score_sets(last, {"val": val_images, "val_proxy": val_proxy})
            np.savez(out / "preds" / f"{name}.npz", y_val=y_val, **probs)
            threshold = metrics.youden_threshold(y_val, probs["val"])
            row = {"run": name, "variant": variant, "seed": seed, **{k: values[k] for k in ("image_size", "epochs")},
                   **figures(y_val, probs["val"], probs["val_proxy"], threshold),
                   "epoch_s_median": float(epochs["epoch_time_s"].median()), "wall_s": wall,
                   "config": str(dataclasses.asdict(cfg) | {"extra": None}), "when": time.strftime("%F %T")}
            append_row(out / "runs.csv", row)
            print(f"{name}: val AUROC {row['val_auroc']:.4f}  proxy AUROC {row['proxy_auroc']:.4f}  proxy accuracy "
                  f"{row['proxy_accuracy']:.3f} (spec {row['proxy_specificity']:.3f}) at {threshold:.3f}; "
                  f"{row['epoch_s_median']:.1f} s/epoch, {wall:.0f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "recipe_proxy",
                        help="where runs, probabilities and runs.csv go (default runs/recipe_proxy)")
    parser.add_argument("command", choices=("cues", "train", "table", "thresholds", "check"))
    parser.add_argument("variants", nargs="*", help=f"train only these ({', '.join(VARIANTS)})")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"recipe_proxy: the real data is not at {DATA} (see README 'Real data')", file=sys.stderr)
        return 2
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        print(f"recipe_proxy: unknown variant(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    {"cues": lambda: cues(BASE["image_size"]), "train": lambda: train(args.out, args.variants)}[args.command]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
