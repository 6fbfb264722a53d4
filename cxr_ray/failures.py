"""Failure cases of the served model: its most confident false positives and false negatives on the
internal test split and on each external set, as a table (from the predictions the evaluation
wrote: no torch) and a thumbnail grid with Grad-CAM overlays (torch, loaded only to draw).

The thumbnails are the study's own decoded images, read from the cache each set was decoded into
(``cache`` in data_report.json and external/<name>/audit.json): nothing is decoded again. A grid is
drawn once: while the report directory holds a grid whose table lists the same cases, the grid is
kept as it is, so `cxr-ray report` over a finished study never needs torch.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import data, storage
from .data import CLASSES
from .results import Missing, Study

PER_KIND = 8  # cases of each kind shown per set
KINDS = ("false positive", "false negative")
TABLE_COLUMNS = ("error", "item", "patient", "label", "probability", "threshold")


@dataclass
class FailureSet:
    """One scored set's failure cases: the table, and the grid (or why there is none)."""
    name: str  # "test" or the external set's name
    where: str  # "the internal test split", "external set NAME"
    cases: pd.DataFrame  # TABLE_COLUMNS + the set's metadata columns, false positives first
    cache: str | None  # the directory of the set's decoded images
    png: bytes = b""
    why_no_grid: str = ""


def served_run(s: Study) -> tuple[str, int]:
    """The run the study serves by default (best.json: its best arm's seed chosen on validation)."""
    s.need("best.json")
    return s.best["arm"], int(s.best["seed"])


def most_confident_errors(predictions: pd.DataFrame, arm: str, seed: int, n: int = PER_KIND) -> pd.DataFrame:
    """The run's ``n`` false positives with the highest probability and ``n`` false negatives with
    the lowest, each at the run's own threshold (ties keep the predictions' order)."""
    run = predictions[(predictions["arm"] == arm) & (predictions["seed"] == seed)]
    if run.empty:
        raise Missing(f"the predictions hold no rows of the served run ({arm}, seed {seed})")
    called = run["probability"] >= run["threshold"]
    fp = run[(run["label"] == 0) & called].sort_values("probability", ascending=False, kind="stable").head(n)
    fn = run[(run["label"] == 1) & ~called].sort_values("probability", ascending=True, kind="stable").head(n)
    return pd.concat([fp.assign(error=KINDS[0]), fn.assign(error=KINDS[1])], ignore_index=True)


def with_metadata(cases: pd.DataFrame, items: pd.DataFrame | None) -> pd.DataFrame:
    """The cases' table columns, then each metadata column (sex, age, view, site, ...) of their items."""
    out = cases[list(TABLE_COLUMNS)].assign(label=[CLASSES[int(y)] for y in cases["label"]],
                                            item=cases["item"].astype(str))
    meta = data.metadata_columns(items) if items is not None else []
    if not meta:
        return out
    return out.merge(items[["item", *meta]].astype({"item": str}).drop_duplicates("item"), on="item", how="left")


def failure_sets(s: Study) -> list[FailureSet]:
    """The served run's failure cases on the test split and on every scored external set (no grids yet)."""
    arm, seed = served_run(s)
    s.need("predictions.csv")
    sets = [FailureSet("test", "the internal test split", with_metadata(
        most_confident_errors(s.predictions, arm, seed), s.split), (s.data_report or {}).get("cache"))]
    for name, ext in s.externals.items():
        if ext.predictions is None:
            continue
        index_uri = storage.join(s.dir, "external", name, "index.csv")
        items = storage.read_csv(index_uri, dtype={"item": str}) if storage.exists(index_uri) else None
        sets.append(FailureSet(name, f"external set {name}", with_metadata(
            most_confident_errors(ext.predictions, arm, seed), items), (ext.audit or {}).get("cache")))
    return sets


# ----------------------------------------------------------------------------- the grids

def attach_grids(s: Study, sets: list[FailureSet]) -> None:
    """Give each set its grid: the report's own when it shows the same cases, else drawn now (one
    model load for every set). A set whose images or model are not here says why instead."""
    todo = []
    for fs in sets:
        fs.png = previous_grid(s, fs)
        if fs.png or fs.cases.empty:
            fs.why_no_grid = "" if fs.png else "no misclassified image"
            continue
        if not fs.cache or not os.path.exists(os.path.join(fs.cache, "images.npy")):
            fs.why_no_grid = (f"its decoded images are not on this machine (cache {fs.cache or 'not recorded'}); "
                              f"run the report where the study decoded them")
            continue
        todo.append(fs)
    if not todo:
        return
    from .serve_model import choose_model
    choice = choose_model(s.dir)  # the default served model: best.json's run
    if not all(os.path.exists(os.path.join(c, "model.safetensors")) for c in choice.checkpoints):
        for fs in todo:
            fs.why_no_grid = f"the served checkpoint ({choice.identity['checkpoint']}) holds no model weights"
        return
    tiles = {}
    for fs in todo:
        images, index = data.read_cache(fs.cache)
        row_of = dict(zip(index["item"], range(len(index))))
        absent = [i for i in fs.cases["item"] if i not in row_of]
        if absent:
            fs.why_no_grid = f"{len(absent)} of its images are not in the cache {fs.cache} (e.g. {absent[0]})"
            continue
        tiles[fs.name] = [np.asarray(images[row_of[i]]) for i in fs.cases["item"]]
    if not tiles:
        return
    if os.environ.get("RAY_ADDRESS"):  # on a cluster, as scoring does: a Ray task loads the model, not this process
        from . import runtime
        heat = runtime.worker_task(heatmaps, s.spec.resources, s.dir, tiles)
    else:
        heat = heatmaps(s.dir, tiles)
    for fs in todo:
        if fs.name in tiles:
            fs.png = grid_png(fs, tiles[fs.name], heat[fs.name], s.best["arm"], int(s.best["seed"]))


def heatmaps(sdir: str, tiles: dict[str, list[np.ndarray]]) -> dict[str, list]:
    """Each set's tiles' Grad-CAM maps under the served model (None each where its backbone gives tokens)."""
    from .serve_model import choose_model
    from .serve_predictor import Predictor  # torch: only when a grid must be drawn
    predictor = Predictor(choose_model(sdir))
    return {name: [predictor.gradcam(t)[0] if predictor.explainable else None for t in ts]
            for name, ts in tiles.items()}


def previous_grid(s: Study, fs: FailureSet) -> bytes:
    """The grid the last report drew for this set, if its table lists these same cases."""
    png, table = (storage.join(s.dir, "report", f"failures_{fs.name}.{ext}") for ext in ("png", "csv"))
    if not (storage.exists(png) and storage.exists(table)):
        return b""
    try:
        before = storage.read_csv(table, dtype={"item": str})
    except ValueError:
        return b""
    same = (len(before) == len(fs.cases) and list(before.get("item", [])) == list(fs.cases["item"].astype(str))
            and np.allclose(before["probability"], fs.cases["probability"], atol=1e-6))
    return storage.read_bytes(png) if same else b""


def grid_png(fs: FailureSet, tiles: list[np.ndarray], heat: list, arm: str, seed: int) -> bytes:
    """One row per kind of error, one tile per case: the image with its Grad-CAM overlay, the
    score against the threshold, and the item's name, patient and metadata."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .imaging import overlay
    per_row = max(4, min(PER_KIND, fs.cases["error"].value_counts().max()))  # 4: room for the title
    meta = [c for c in fs.cases.columns if c not in TABLE_COLUMNS]
    fig = Figure(figsize=(1.9 * per_row, 2 * (2.3 + 0.16 * len(meta))), dpi=100, layout="constrained")
    axes = fig.subplots(2, per_row, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for r, kind in enumerate(KINDS):
        rows = np.flatnonzero((fs.cases["error"] == kind).to_numpy())
        axes[r, 0].set_title(f"{kind}s: none" if not len(rows) else "", loc="left", fontsize=9)
        for c, k in enumerate(rows[:per_row]):
            case, ax = fs.cases.iloc[k], axes[r, c]
            ax.imshow(tiles[k] if heat[k] is None else overlay(tiles[k], heat[k]), cmap="gray", vmin=0, vmax=255)
            lines = [f"{kind} #{c + 1}", f"P={case['probability']:.3f} (thr {case['threshold']:.3f})",
                     short(case["item"]), f"patient {short(case['patient'])}"]
            lines += [f"{m}: {short(case[m])}" for m in meta if not is_blank(case[m])]
            ax.set_title("\n".join(lines), fontsize=6.5, loc="left")
    fig.suptitle(f"Most confident errors of {arm} (seed {seed}) on {fs.where}" +
                 ("" if heat and heat[0] is not None else " (no Grad-CAM: the backbone gives tokens)"), fontsize=9)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def short(value, width: int = 22) -> str:
    text = str(value)
    return text if len(text) <= width else "…" + text[-(width - 1):]


def is_blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
