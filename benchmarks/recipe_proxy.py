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
    nice -n 15 .venv/bin/python benchmarks/recipe_proxy.py --out DIR ablate [VARIANT ...]  # the view one cue at a time
    .venv/bin/python benchmarks/recipe_proxy.py --out DIR table                    # variants, ensembles, TTA
    .venv/bin/python benchmarks/recipe_proxy.py --out DIR thresholds [VARIANT ...]  # threshold rules, cross-fitted
    .venv/bin/python benchmarks/recipe_proxy.py --out DIR check                    # ONCE, after choosing: test, shared third
    .venv/bin/python benchmarks/recipe_proxy.py --study runs/kaggle_cpu study     # a finished study's runs on the view

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
    # the previous recipe, which learns the squash shortcut (README): does the view catch it?
    "mild": ({"augment": "mild", "ema_decay": 0.0, "epochs": 5}, (0,)),
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


def queue(names: list[str]) -> list[tuple[str, int]]:
    """(variant, seed) to train, in the order given: a variant (all its seeds) or one run (VARIANT-sSEED)."""
    todo = []
    for name in names or list(VARIANTS):
        variant, _, seed = name.rpartition("-s") if name not in VARIANTS else (name, "", "")
        todo += [(variant, int(seed))] if seed else [(name, s) for s in VARIANTS[name][1]]
    return todo


def train(out: Path, names: list[str]) -> None:
    import torch

    from cxr_ray import metrics, training
    from cxr_ray.config import TrainConfig
    torch.set_num_threads(1)
    (out / "preds").mkdir(parents=True, exist_ok=True)
    views = {}  # image size -> validation films and their view
    for variant, seed in queue(names):
        name = run_name(variant, seed)
        if (out / "preds" / f"{name}.npz").exists():
            continue
        values = BASE | VARIANTS[variant][0]
        prep = prepared(values["image_size"])
        data = loop_data(prep)
        y_val = data["labels"][data["val"]].astype(int)
        if values["image_size"] not in views:
            views[values["image_size"]] = data["images"][data["val"]], proxy_views(data["images"][data["val"]])
        val_images, val_proxy = views[values["image_size"]]
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


def ablate(out: Path, names: list[str]) -> None:
    """Which cue a model leans on: its validation AUROC and specificity (at its validation threshold)
    on the view with one part at a time, and with all."""
    import torch

    from cxr_ray import metrics, models, proxy, training
    torch.set_num_threads(1)
    runs = load_preds(out)
    print(f"{'run':<14}{'val':>8}" + "".join(f"{p or 'all':>18}" for p in (*proxy.PARTS, "")) + "   (AUROC / specificity)")
    for name in [run_name(*r) for r in queue(names)] if names else list(runs):
        if name not in runs:
            continue
        values = BASE | VARIANTS[name.rpartition("-s")[0]][0]
        prep = prepared(values["image_size"])
        films, y = np.asarray(prep.cache.images[prep.rows["val"]]), runs[name]["y_val"]
        model, meta = models.load_checkpoint(training.checkpoint_uri(str(out / "runs" / name), values["epochs"]))
        t = metrics.youden_threshold(y, runs[name]["val"])
        cells = []
        for part in (*proxy.PARTS, None):
            parts = (part,) if part else proxy.PARTS
            x = np.concatenate([proxy.view(films, seed, parts) for seed in VIEW_SEEDS])
            p = models.predict(model, x, np.arange(len(x)), (meta["mean"], meta["std"]), torch.device("cpu"))
            yy = np.tile(y, len(VIEW_SEEDS))
            cells.append(f"{metrics.auroc(yy, p):.4f} / {metrics.confusion(yy, p, t)['specificity']:.3f}")
        print(f"{name:<14}{metrics.auroc(y, runs[name]['val']):>8.4f}" + "".join(f"{c:>18}" for c in cells), flush=True)


def load_preds(out: Path, folder: str = "preds") -> dict[str, dict[str, np.ndarray]]:
    """Every finished run's probabilities (``folder``: preds, or check for the final scoring), by run."""
    return {f.stem: dict(np.load(f)) for f in sorted((out / folder).glob("*.npz"))}


def models_scored(out: Path, folder: str = "preds") -> dict[str, dict[str, np.ndarray]]:
    """Every run, each variant's seed ensemble (mean probability, when it has several seeds), and
    each of these with test-time augmentation: name -> {set: probabilities}."""
    runs = load_preds(out, folder)
    scored: dict[str, dict[str, np.ndarray]] = {}
    for variant in VARIANTS:
        members = [runs[n] for n in sorted(runs) if n.rsplit("-s", 1)[0] == variant]
        if not members:
            continue
        sets = [k for k in members[0] if not k.startswith("y_") and not k.endswith("_tta")]
        for tta in ("", "_tta"):
            for name in sorted(runs):
                if name.rsplit("-s", 1)[0] == variant:
                    scored[f"{name}{tta}"] = {k: runs[name][k + tta] for k in sets}
            if len(members) > 1:
                scored[f"{variant}-ensemble{tta}"] = {k: np.mean([m[k + tta] for m in members], 0) for k in sets}
    return scored


def table(out: Path) -> None:
    """Per variant: the mean over its seeds, its seed ensemble, each with TTA; each model's
    threshold is Youden's on its own validation probabilities."""
    from cxr_ray import metrics
    runs = pd.read_csv(out / "runs.csv").drop_duplicates("run", keep="last").set_index("run")
    y = next(iter(load_preds(out).values()))["y_val"]
    rows = []
    for name, p in models_scored(out).items():
        base = name.removesuffix("_tta")
        variant, member = base.rsplit("-", 1)
        row = figures(y, p["val"], p["val_proxy"], metrics.youden_threshold(y, p["val"]))
        row["val_accuracy"] = metrics.confusion(y, p["val"], row["threshold"])["accuracy"]
        rows.append({"variant": variant + ("+TTA" if name.endswith("_tta") else ""), "model": member, **row,
                     "s_per_epoch": runs.loc[base, "epoch_s_median"] if base in runs.index else np.nan})
    df = pd.DataFrame(rows)
    singles = df[df["model"] != "ensemble"].groupby("variant", sort=False)
    summary = singles.mean(numeric_only=True).assign(models=singles.size().astype(str) + " seeds")
    ensembles = df[df["model"] == "ensemble"].set_index("variant").assign(models="ensemble")
    ensembles.index = ensembles.index.str.replace("+TTA", "") + " ensemble" + np.where(
        ensembles.index.str.endswith("+TTA"), "+TTA", "")
    show = pd.concat([summary, ensembles.drop(columns="model")])
    print(f"{'variant':<24}{'models':>10}{'val AUROC':>11}{'val acc':>9}{'proxy AUROC':>13}"
          f"{'proxy acc':>11}{'sens':>7}{'spec':>7}{'thr':>7}{'s/epoch':>9}")
    for name, r in show.iterrows():
        print(f"{name:<24}{r['models']:>10}{r['val_auroc']:>11.4f}{r['val_accuracy']:>9.3f}{r['proxy_auroc']:>13.4f}"
              f"{r['proxy_accuracy']:>11.3f}{r['proxy_sensitivity']:>7.3f}{r['proxy_specificity']:>7.3f}"
              f"{r['threshold']:>7.3f}{r['s_per_epoch']:>9.1f}")
    df.to_csv(out / "table.csv", index=False)
    print(f"(validation: {len(y)} films, {int(y.sum())} PNEUMONIA; the view: the same films, view seeds "
          f"{', '.join(map(str, VIEW_SEEDS))} pooled; val acc is at the threshold chosen on those very films)")


# ----------------------------------------------------------------------------- threshold rules

def j_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Youden's J of "p >= t" at every distinct score t (descending)."""
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    last = np.r_[ps[1:] != ps[:-1], True]
    return ps[last], np.cumsum(ys)[last] / ys.sum() - np.cumsum(1 - ys)[last] / (1 - ys).sum()


def bootstrap_maxima(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Over ``n`` patient resamples of the sample: each resample's Youden threshold and maximal J."""
    from cxr_ray import metrics
    thresholds, maxima = [], []
    for idx in metrics.patient_bootstrap(groups, n, seed=0):
        if 0 < y[idx].sum() < len(idx):
            t, j = j_curve(y[idx], p[idx])
            thresholds.append(t[np.argmax(j)])  # the highest threshold of maximal J, as metrics.youden_threshold
            maxima.append(j.max())
    return np.array(thresholds), np.array(maxima)


def interval_middle(t: np.ndarray, j: np.ndarray, floor: float) -> float:
    """The middle, on the logit scale, of the thresholds whose J is at least ``floor``: from the
    score just below the lowest such threshold to the highest one."""
    from cxr_ray import metrics
    good = np.flatnonzero(j >= floor)
    hi, lo = t[good.min()], t[min(good.max() + 1, len(t) - 1)]
    return float(1 / (1 + np.exp(-(metrics.logit(hi) + metrics.logit(lo)) / 2)))


def rule_thresholds(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Each prototyped rule's threshold on one labelled sample:
      youden      the product's policy today: the highest threshold of maximal J
      boot-median the median of the Youden thresholds of 200 patient resamples
      plateau-mid the middle (logit scale) of the thresholds of maximal J
      noise-mid   the middle of the thresholds within the resampling noise of maximal J (one SD of the
                  resampled maxima below it)
      sens-0.95, calibrated: the product's sensitivity (target 0.95) and calibrated policies, for comparison"""
    from cxr_ray import metrics
    t, j = j_curve(y, p)
    boot_t, boot_j = bootstrap_maxima(y, p, groups)
    return {"youden": metrics.youden_threshold(y, p), "boot-median": float(np.median(boot_t)),
            "plateau-mid": interval_middle(t, j, j.max() - 1e-12),
            "noise-mid": interval_middle(t, j, j.max() - boot_j.std()),
            "sens-0.95": metrics.threshold_at_sensitivity(y, p, 0.95),
            "calibrated": metrics.operating_point("calibrated", y, p)["threshold"]}


def thresholds(out: Path, variants: list[str], halvings: int = 40) -> None:
    """Each rule chosen on one half of the validation patients (clean) and scored on the other half,
    clean and on its view, over random halvings: how the point holds on new films and on shifted ones,
    and how much it moves (the spread of the chosen threshold)."""
    from cxr_ray import metrics
    prep = prepared(BASE["image_size"])
    groups = prep.cache.index["patient"].to_numpy()[prep.rows["val"]]
    y = next(iter(load_preds(out).values()))["y_val"]
    copies = len(VIEW_SEEDS)
    rng = np.random.default_rng(0)
    patients = np.unique(groups)
    splits = [np.isin(groups, rng.choice(patients, len(patients) // 2, replace=False)) for _ in range(halvings)]
    rows = []
    for name, p in models_scored(out).items():
        if variants and name.removesuffix("_tta").rsplit("-", 1)[0] not in variants:
            continue
        proxy_p = p["val_proxy"].reshape(copies, -1)
        for a in splits:
            b = ~a
            for rule, t in rule_thresholds(y[a], p["val"][a], groups[a]).items():
                clean = metrics.confusion(y[b], p["val"][b], t)
                shifted = metrics.confusion(np.tile(y[b], copies), proxy_p[:, b].ravel(), t)
                rows.append({"model": name, "rule": rule, "threshold": t, "accuracy": clean["accuracy"],
                             "specificity": clean["specificity"], "proxy_accuracy": shifted["accuracy"],
                             "proxy_sensitivity": shifted["sensitivity"], "proxy_specificity": shifted["specificity"]})
    df = pd.DataFrame(rows)
    df.to_csv(out / "thresholds.csv", index=False)
    df["kind"] = np.where(df["model"].str.contains("ensemble"), "ensemble", "single") + np.where(
        df["model"].str.endswith("_tta"), "+TTA", "")
    df["variant"] = df["model"].str.replace("_tta", "").str.rsplit("-", n=1).str[0]
    print(f"threshold rules, chosen on half the validation patients, scored on the other half ({halvings} halvings; "
          f"means; threshold: median [IQR] of the chosen points)")
    print(f"{'variant':<10}{'model':<16}{'rule':<13}{'threshold':>22}{'acc':>7}{'spec':>7}"
          f"{'proxy acc':>11}{'sens':>7}{'spec':>7}")
    for (variant, kind, rule), g in df.groupby(["variant", "kind", "rule"], sort=False):
        q1, med, q3 = np.quantile(g["threshold"], [0.25, 0.5, 0.75])
        print(f"{variant:<10}{kind:<16}{rule:<13}{med:>9.3f} [{q1:.3f}-{q3:.3f}]{g['accuracy'].mean():>7.3f}"
              f"{g['specificity'].mean():>7.3f}{g['proxy_accuracy'].mean():>11.3f}"
              f"{g['proxy_sensitivity'].mean():>7.3f}{g['proxy_specificity'].mean():>7.3f}")


# ----------------------------------------------------------------------------- the check, once

def external_films(size: int, pool_sha1: set) -> tuple[np.ndarray, np.ndarray]:
    """The shared external third at ``size`` px, less any film byte-identical to the training data."""
    from cxr_ray import data
    cache = data.build_cache(data.list_source("kaggle", str(EXTERNAL)), size, progress=False)
    keep = ~cache.index["sha1"].isin(pool_sha1).to_numpy()
    return np.asarray(cache.images)[keep], cache.index["label"].to_numpy()[keep].astype(int)


def check(out: Path) -> None:
    """Score every finished run ONCE on the internal test split, its view and the shared external
    third (after every choice was made on validation and the view), then print them side by side."""
    from cxr_ray import metrics, training
    (out / "check").mkdir(exist_ok=True)
    sets_by_size = {}
    for name in sorted(load_preds(out)):
        if (out / "check" / f"{name}.npz").exists():
            continue
        values = BASE | VARIANTS[name.rpartition("-s")[0]][0]
        size = values["image_size"]
        if size not in sets_by_size:
            prep = prepared(size)
            images, labels = np.asarray(prep.cache.images), prep.cache.index["label"].to_numpy().astype(int)
            ext_images, y_ext = external_films(size, set(prep.cache.index["sha1"]))
            test = images[prep.rows["test"]]
            sets_by_size[size] = ({"test": test, "test_proxy": proxy_views(test), "external": ext_images},
                                  {"y_test": labels[prep.rows["test"]], "y_external": y_ext})
        sets, labels = sets_by_size[size]
        probs = score_sets(training.checkpoint_uri(str(out / "runs" / name), values["epochs"]), sets)
        np.savez(out / "check" / f"{name}.npz", **load_preds(out)[name], **labels, **probs)
        print(f"{name}: scored", flush=True)

    any_run = next(iter(load_preds(out, "check").values()))
    y_val, y_test, y_ext = any_run["y_val"], any_run["y_test"], any_run["y_external"]
    rows = []
    for name, p in models_scored(out, "check").items():
        t = metrics.youden_threshold(y_val, p["val"])
        test, ext = metrics.summary(y_test, p["test"], t), metrics.summary(y_ext, p["external"], t)
        test_proxy = metrics.summary(np.tile(y_test, len(VIEW_SEEDS)), p["test_proxy"], t)
        base = name.removesuffix("_tta")
        rows.append({"model": name, "variant": base.rsplit("-", 1)[0] + ("+TTA" if name.endswith("_tta") else ""),
                     "kind": "ensemble" if base.endswith("ensemble") else "single", "threshold": t,
                     "val_auroc": metrics.auroc(y_val, p["val"]),
                     "proxy_auroc": metrics.auroc(np.tile(y_val, len(VIEW_SEEDS)), p["val_proxy"]),
                     **{f"test_{k}": v for k, v in test.items()}, **{f"test_proxy_{k}": v for k, v in test_proxy.items()},
                     **{f"external_{k}": v for k, v in ext.items()}})
    df = pd.DataFrame(rows)
    df.to_csv(out / "check.csv", index=False)
    shown = df.groupby(["variant", "kind"], sort=False).mean(numeric_only=True)
    print(f"internal test ({len(y_test)} films), its view, and the shared external third ({len(y_ext)} films), "
          f"each model at its own Youden threshold from validation (single: mean over seeds)")
    print(f"{'variant':<16}{'model':<10}{'val':>7}{'proxy':>7} | {'test AUROC':>10}{'acc':>7} | {'view AUROC':>10}"
          f"{'acc':>7} | {'ext AUROC':>9}{'acc':>7}{'sens':>7}{'spec':>7}")
    for (variant, kind), r in shown.iterrows():
        print(f"{variant:<16}{kind:<10}{r['val_auroc']:>7.4f}{r['proxy_auroc']:>7.4f} | {r['test_auroc']:>10.4f}"
              f"{r['test_accuracy']:>7.3f} | {r['test_proxy_auroc']:>10.4f}{r['test_proxy_accuracy']:>7.3f} | "
              f"{r['external_auroc']:>9.4f}{r['external_accuracy']:>7.3f}{r['external_sensitivity']:>7.3f}"
              f"{r['external_specificity']:>7.3f}")

    prep = prepared(BASE["image_size"])
    groups = prep.cache.index["patient"].to_numpy()[prep.rows["val"]]
    rules = []
    for name, p in models_scored(out, "check").items():
        for rule, t in rule_thresholds(y_val, p["val"], groups).items():
            rules.append({"model": name, "rule": rule, "threshold": t,
                          **{f"test_proxy_{k}": v for k, v in metrics.confusion(
                              np.tile(y_test, len(VIEW_SEEDS)), p["test_proxy"], t).items()},
                          **{f"external_{k}": v for k, v in metrics.confusion(y_ext, p["external"], t).items()}})
    rules = pd.DataFrame(rules)
    rules.to_csv(out / "check_thresholds.csv", index=False)
    print("threshold rules chosen on all of validation: accuracy / specificity on the view of the internal test "
          "split and on the shared third")
    for model, g in rules.groupby("model", sort=False):
        print(f"  {model:<24}" + "  ".join(f"{r.rule} {r.threshold:.3f}: {r.test_proxy_accuracy:.3f}/"
                                          f"{r.test_proxy_specificity:.3f}, {r.external_accuracy:.3f}/"
                                          f"{r.external_specificity:.3f}" for r in g.itertuples()))


def study(run: Path) -> None:
    """A finished study of studies/kaggle_cpu.yaml (default runs/kaggle_cpu): each final run, its seed
    ensemble and the served model on validation, on the view of validation, on the internal test split and
    on its view, each at the threshold the study chose on validation (final.csv, best.json). The study's
    own figures come from its report; this adds the view's, from training data alone."""
    import json

    from cxr_ray import metrics, models
    from cxr_ray import spec as specs
    spec = specs.validate_text((run / "spec.yaml").read_text(), str(run / "spec.yaml"))
    prep = prepared(spec.data.image_size)
    split = pd.read_csv(run / "split.csv")
    items = prep.cache.index["item"].to_numpy()
    for name in ("val", "test"):  # the same split as the study's, or the figures would mean nothing
        assert set(items[prep.rows[name]]) == set(split.loc[split["split"] == name, "item"]), name
    images, labels = np.asarray(prep.cache.images), prep.cache.index["label"].to_numpy().astype(int)
    sets = {}
    for name in ("val", "test"):
        x = images[prep.rows[name]]
        sets[name], sets[f"{name}_view"] = (x, labels[prep.rows[name]]), (proxy_views(x), np.tile(
            labels[prep.rows[name]], len(VIEW_SEEDS)))
    final = pd.read_csv(run / "final.csv")
    keys = [f"{r.arm}/{r.seed}" for r in final.itertuples()]
    stacked = np.concatenate([x for x, _ in sets.values()])
    t0 = time.time()
    scored = models.predict_checkpoints({k: str(run / c) for k, c in zip(keys, final["checkpoint"])}, stacked)
    print(f"scored {len(keys)} checkpoints on {len(stacked)} films in {time.time() - t0:.1f} s", flush=True)
    bounds = np.cumsum([0] + [len(x) for x, _ in sets.values()])
    probs = {k: {name: scored[k][a:b] for name, a, b in zip(sets, bounds[:-1], bounds[1:])} for k in keys}
    best = json.loads((run / "best.json").read_text())
    ensemble = f"{best['arm']}/ensemble"  # the served arm's seeds: mean probability, at the ensemble's point
    probs[ensemble] = {n: np.mean([probs[k][n] for k in keys if k.startswith(f"{best['arm']}/")], axis=0)
                       for n in sets}
    rows = []
    for key, t in [*zip(keys, final["threshold"]), (ensemble, best["ensemble"]["threshold"])]:
        row = {"model": key, "served": key == f"{best['arm']}/{best['seed']}", "threshold": t}
        for name, (_, y) in sets.items():
            c = metrics.confusion(y, probs[key][name], t)
            row |= {f"{name}_auroc": metrics.auroc(y, probs[key][name]), f"{name}_accuracy": c["accuracy"],
                    f"{name}_sensitivity": c["sensitivity"], f"{name}_specificity": c["specificity"]}
        rows.append(row)
    df = pd.DataFrame(rows)
    df.to_csv(run / "proxy.csv", index=False)
    print(f"{run.name}: validation ({len(sets['val'][1])} films), its view (x{len(VIEW_SEEDS)}), internal test "
          f"({len(sets['test'][1])}) and its view, each model at its own threshold from validation -> {run / 'proxy.csv'}")
    print(f"{'model':<30}{'thr':>6} | {'val AUROC':>9}{'acc':>7} | {'view AUROC':>10}{'acc':>7}{'sens':>7}{'spec':>7} | "
          f"{'test AUROC':>10}{'acc':>7} | {'view AUROC':>10}{'acc':>7}{'spec':>7}")
    for r in df.itertuples():
        print(f"{r.model + (' (served)' if r.served else ''):<30}{r.threshold:>6.3f} | {r.val_auroc:>9.4f}"
              f"{r.val_accuracy:>7.3f} | {r.val_view_auroc:>10.4f}{r.val_view_accuracy:>7.3f}"
              f"{r.val_view_sensitivity:>7.3f}{r.val_view_specificity:>7.3f} | {r.test_auroc:>10.4f}"
              f"{r.test_accuracy:>7.3f} | {r.test_view_auroc:>10.4f}{r.test_view_accuracy:>7.3f}"
              f"{r.test_view_specificity:>7.3f}")
    for arm, g in df[~df["model"].str.endswith("ensemble")].groupby(df["model"].str.split("/").str[0], sort=False):
        print(f"  {arm}: mean of {len(g)} seeds: view of validation AUROC {g['val_view_auroc'].mean():.4f}, "
              f"accuracy {g['val_view_accuracy'].mean():.3f}, specificity {g['val_view_specificity'].mean():.3f}; "
              f"view of test AUROC {g['test_view_auroc'].mean():.4f}, accuracy {g['test_view_accuracy'].mean():.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "recipe_proxy",
                        help="where runs, probabilities and runs.csv go (default runs/recipe_proxy)")
    parser.add_argument("--study", type=Path, default=ROOT / "runs" / "kaggle_cpu",
                        help="study: the finished study of studies/kaggle_cpu.yaml to score (default runs/kaggle_cpu)")
    parser.add_argument("command", choices=("cues", "train", "ablate", "table", "thresholds", "check", "study"))
    parser.add_argument("variants", nargs="*", help=f"train only these, in this order: variants "
                        f"({', '.join(VARIANTS)}) or single runs (VARIANT-sSEED)")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"recipe_proxy: the real data is not at {DATA} (see README 'Real data')", file=sys.stderr)
        return 2
    unknown = {n for n in args.variants if n not in VARIANTS and n.rpartition("-s")[0] not in VARIANTS}
    if unknown:
        print(f"recipe_proxy: unknown variant(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    {"cues": lambda: cues(BASE["image_size"]), "train": lambda: train(args.out, args.variants),
     "ablate": lambda: ablate(args.out, args.variants),
     "table": lambda: table(args.out), "thresholds": lambda: thresholds(args.out, args.variants),
     "check": lambda: check(args.out), "study": lambda: study(args.study)}[args.command]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
