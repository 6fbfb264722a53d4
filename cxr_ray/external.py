"""Data collected apart from the study: external evaluation sets and deployment-site samples.

Both are labelled image sets decoded at the study's image size by the cache's own code, scored by
the study's final checkpoints (nothing is retrained), and kept apart from every choice the study
made: an external set is audited against the study's images, then scored once
(``evaluation.evaluate_external``); a site sample fits a threshold (and calibration) for serving at
that site, stored as a named profile in the study directory (``sites/<name>.json``).
"""
from __future__ import annotations

import numpy as np
import torch

from . import data, evaluation, metrics, models, spec as specs, storage
from .errors import CxrError


class ExternalError(CxrError, ValueError):
    """An external set or site sample that cannot be used; the message names it."""


def load_set(ext: specs.External, size: int, cache_root: str | None = None, progress: bool = False) -> data.Cache:
    """Decode a labelled set (every image, or one source split) at ``size`` into the cache."""
    source = data.list_source(ext.source, ext.path, synthetic=ext.synthetic_set, manifest=ext.manifest_format)
    cache = data.build_cache(source, size, cache_root, progress=progress)
    if ext.split:
        keep = (cache.index["source_split"] == ext.split).to_numpy()
        if not keep.any():
            raise ExternalError(f"{ext.name}: no images in split {ext.split!r} of {source.path} (splits: "
                                f"{', '.join(sorted(set(cache.index['source_split'])))})")
        cache = data.Cache(cache.dir, cache.images[keep], cache.index[keep].reset_index(drop=True))
    return cache


def audit(spec: specs.Spec, sdir: str, ext: specs.External, cache_root: str | None = None):
    """The set's cache and its overlap with the study's images (flags per image, and a summary).
    The set's index (items, labels, patients, metadata, flags) is kept as external/<name>/index.csv,
    so what is scored there can be broken down by subgroup from the study directory alone."""
    cache = load_set(ext, spec.data.image_size, cache_root or spec.data.cache)
    flagged, summary = data.audit_overlap(cache.index, storage.read_csv(storage.join(sdir, "split.csv"),
                                                                         dtype={"patient": str, "sha1": str}))
    storage.write_csv(storage.join(sdir, "external", ext.name, "index.csv"), flagged)
    source = {"source": ext.source, "path": ext.path, "split": ext.split}
    if ext.source == "synthetic":
        source |= {"synthetic_images": ext.synthetic_images, "synthetic_seed": ext.synthetic_seed,
                   "synthetic_shift": ext.synthetic_shift}
    return cache, flagged, summary | {"name": ext.name, "set": source,
                                      "classes": flagged["label"].value_counts().sort_index().to_dict(),
                                      "composition": data.composition(flagged)}


def score_checkpoints(sdir: str, checkpoints: dict, images: np.ndarray) -> dict:
    """key -> P(pneumonia) of every image under that key's checkpoint (relative to ``sdir``)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = np.arange(len(images))
    out = {}
    for key, relative in checkpoints.items():
        model, meta = models.load_checkpoint(storage.local_dir(storage.join(sdir, relative)))
        out[key] = models.predict(model.to(device), images, rows, (meta["mean"], meta["std"]), device)
    return out


def evaluate_set(spec: specs.Spec, sdir: str, ext: specs.External, cache_root: str | None = None) -> dict:
    """Audit an external set, score it with every final run, and write external/<name>/."""
    if storage.exists(storage.join(sdir, "external", ext.name, "summary.csv")):
        raise ExternalError(f"{sdir}: external set {ext.name!r} was already evaluated (external/{ext.name}/); "
                            "choose another name to score another set")
    cache, flagged, summary = audit(spec, sdir, ext, cache_root)
    runs, _ = evaluation.load_study_runs(spec, sdir)
    probs = score_checkpoints(sdir, {k: r.checkpoints[0] for k, r in runs.items()}, cache.images)
    return evaluation.evaluate_external(spec, sdir, ext.name, flagged, probs, summary)


def calibrate_site(spec: specs.Spec, sdir: str, name: str, ext: specs.External, policy: str, target: float | None,
                   cache_root: str | None = None) -> dict:
    """Fit the served model's operating point on a labelled sample of a deployment site and store it
    as the profile ``sites/<name>.json`` (nothing is retrained). The sample must not be the one used
    to report results at that site: it chose the threshold."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ExternalError(f"site name must be a word of letters, digits, - and _ (got {name!r})")
    best = storage.read_json(storage.join(sdir, "best.json"))
    cache = load_set(ext, spec.data.image_size, cache_root)
    y = cache.index["label"].to_numpy()
    if len(set(y)) < 2:
        raise ExternalError(f"site sample {ext.path}: {len(y)} images of a single class; the threshold needs both")
    ensemble = best["ensemble"]["checkpoints"]  # the served model is one of them: each is scored once
    probs = score_checkpoints(sdir, {c: c for c in dict.fromkeys([best["checkpoint"], *ensemble])}, cache.images)
    profile = {"name": name, "policy": policy, "target": target, "images": len(y),
               "classes": {"NORMAL": int((y == 0).sum()), "PNEUMONIA": int((y == 1).sum())},
               "sample": {"source": ext.source, "path": ext.path, "split": ext.split}}
    for model, p in (("model", probs[best["checkpoint"]]), ("ensemble", np.mean([probs[c] for c in ensemble], axis=0))):
        try:
            threshold, platt = evaluation.choose_point(policy, target, y, p)
        except metrics.MetricError as e:
            raise ExternalError(f"site sample {ext.path}: {e}") from None
        profile[model] = {"threshold": threshold, "platt": platt,
                          "on_sample": metrics.summary(y, metrics.apply_platt(p, platt), threshold)}
    storage.write_json(storage.join(sdir, "sites", f"{name}.json"), profile)
    return profile
