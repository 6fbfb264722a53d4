"""Data collected apart from the study: external evaluation sets and deployment-site samples.

Both are labelled image sets decoded at the study's image size by the cache's own code, scored by
the study's final checkpoints (nothing is retrained), and kept apart from every choice the study
made: an external set is audited against the study's images, then scored once
(``evaluation.evaluate_external``); a site sample fits a threshold (and calibration) for serving at
that site, stored as a named profile in the study directory (``sites/<name>.json``). The external
sets a study names are scored by its final runs themselves, at their last epoch; sets scored later
(and site samples) by the checkpoints, here or, on a cluster, in a Ray task.
"""
from __future__ import annotations

import os

import numpy as np

from . import data, evaluation, metrics, operating, spec as specs, storage
from .errors import CxrError


class ExternalError(CxrError, ValueError):
    """An external set or site sample that cannot be used; the message names it."""


def load_set(ext: specs.External, size: int, cache_root: str | None = None,
             progress: bool = False) -> tuple[data.Cache, list[str]]:
    """Decode a labelled set (every image, or one source split) at ``size`` into the cache; with what
    listing it noticed (a manifest's sidecar: converter, label policy; rows listed twice; ...)."""
    source = data.list_source(ext.source, ext.path, synthetic=ext.synthetic_set, manifest=ext.manifest_format)
    cache = data.build_cache(source, size, cache_root, progress=progress)
    if ext.split:
        keep = (cache.index["source_split"] == ext.split).to_numpy()
        if not keep.any():
            raise ExternalError(f"{ext.name}: no images in split {ext.split!r} of {source.path} (splits: "
                                f"{', '.join(sorted(set(cache.index['source_split'])))})")
        cache = data.Cache(cache.dir, cache.images[keep], cache.index[keep].reset_index(drop=True))
    return cache, list(source.notes)


def audit(spec: specs.Spec, sdir: str, ext: specs.External, cache_root: str | None = None):
    """The set's cache and its overlap with the study's images (flags per image, and a summary).
    The set's index (items, labels, patients, metadata, flags) is kept as external/<name>/index.csv,
    so what is scored there can be broken down by subgroup from the study directory alone."""
    cache, notes = load_set(ext, spec.data.image_size, cache_root or spec.data.cache)
    flagged, summary = data.audit_overlap(cache.index, storage.read_csv(storage.join(sdir, "split.csv"),
                                                                         dtype={"patient": str, "sha1": str}))
    storage.write_csv(storage.join(sdir, "external", ext.name, "index.csv"), flagged)
    source = {"source": ext.source, "path": ext.path, "split": ext.split}
    if ext.source == "synthetic":
        source |= {"synthetic_images": ext.synthetic_images, "synthetic_seed": ext.synthetic_seed,
                   "synthetic_shift": ext.synthetic_shift}
    return cache, flagged, summary | {"name": ext.name, "set": source, "notes": notes, "cache": str(cache.dir),
                                      "classes": flagged["label"].value_counts().sort_index().to_dict(),
                                      "composition": data.composition(flagged)}


def _score_here(sdir: str, checkpoints: dict, images: np.ndarray, workers: int | None = None) -> dict:
    from . import models  # torch and timm: imported only where checkpoints are scored
    return models.predict_checkpoints({k: storage.local_dir(storage.join(sdir, c)) for k, c in checkpoints.items()},
                                      images, workers)


def score_checkpoints(spec: specs.Spec, sdir: str, checkpoints: dict, images: np.ndarray) -> dict:
    """key -> P(pneumonia) of every image under that key's checkpoint (relative to ``sdir``).

    On a cluster (RAY_ADDRESS set) the scoring is one Ray task with a trial worker's resources (its
    GPU, its custom resources), on a node that reads the study's storage: this process ships the
    images and never imports torch. Here, it runs in this process, on every core."""
    if not os.environ.get("RAY_ADDRESS"):
        return _score_here(sdir, checkpoints, images)
    from . import runtime
    return runtime.worker_task(_score_here, spec.resources, sdir, checkpoints, images,
                               max(1, int(spec.resources.cpus_per_worker)))


def saved_probabilities(sdir: str, runs: dict, name: str, images: int) -> dict:
    """Each final run's probabilities on the study's own external set ``name``, saved by the run at
    its last epoch (the study hands its external sets to the final runs); runs without them, or
    with another number of images than the set now has, are left out (scored from checkpoints)."""
    out = {}
    for key, run in runs.items():
        uri = storage.join(sdir, run.checkpoints[0], f"external_{name}_probabilities.npy")
        if storage.exists(uri):
            p = evaluation.read_npy(uri)
            if len(p) == images:
                out[key] = p
    return out


def evaluate_set(spec: specs.Spec, sdir: str, ext: specs.External, cache_root: str | None = None,
                 audited: tuple | None = None) -> dict:
    """Audit an external set, score it with every final run, and write external/<name>/.

    ``audited``: the study's own set, as ``audit`` returned it before training; its final runs
    scored it at their last epoch, so only runs that did not are scored now."""
    if storage.exists(storage.join(sdir, "external", ext.name, "summary.csv")):
        raise ExternalError(f"{sdir}: external set {ext.name!r} was already evaluated (external/{ext.name}/); "
                            "choose another name to score another set")
    cache, flagged, summary = audited or audit(spec, sdir, ext, cache_root)
    runs, _ = evaluation.load_study_runs(spec, sdir)
    probs = saved_probabilities(sdir, runs, ext.name, len(cache.images)) if audited else {}
    missing = {k: r.checkpoints[0] for k, r in runs.items() if k not in probs}
    if missing:
        probs |= score_checkpoints(spec, sdir, missing, cache.images)
    return evaluation.evaluate_external(spec, sdir, ext.name, flagged, probs, summary, ext.prevalence)


def calibrate_site(spec: specs.Spec, sdir: str, name: str, ext: specs.External, policy: str, target: float | None,
                   cache_root: str | None = None, prevalence: float | None = None) -> dict:
    """Fit the served model's operating point on a labelled sample of a deployment site and store it
    as the profile ``sites/<name>.json`` (nothing is retrained), with its bootstrap over the sample's
    patients and adjusted to the site's expected ``prevalence`` where the policy depends on it (the
    sample's own class balance may not be the site's). The sample must not be the one used to report
    results at that site: it chose the threshold."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ExternalError(f"site name must be a word of letters, digits, - and _ (got {name!r})")
    best = storage.read_json(storage.join(sdir, "best.json"))
    cache, _ = load_set(ext, spec.data.image_size, cache_root)
    y = cache.index["label"].to_numpy()
    if len(set(y)) < 2:
        raise ExternalError(f"site sample {ext.path}: {len(y)} images of a single class; the threshold needs both")
    ensemble = best["ensemble"]["checkpoints"]  # the served model is one of them: each is scored once
    probs = score_checkpoints(spec, sdir, {c: c for c in dict.fromkeys([best["checkpoint"], *ensemble])}, cache.images)
    sample = operating.Sample.of(y, cache.index["patient"].to_numpy(), spec.final.bootstrap, spec.seed)
    profile = {"name": name, "policy": policy, "target": target, "prevalence": prevalence, "images": len(y),
               "classes": {"NORMAL": int((y == 0).sum()), "PNEUMONIA": int((y == 1).sum())},
               "sample": {"source": ext.source, "path": ext.path, "split": ext.split}}
    for model, p in (("model", probs[best["checkpoint"]]), ("ensemble", np.mean([probs[c] for c in ensemble], axis=0))):
        try:
            point = operating.choose(policy, target, sample, p, prevalence)
        except metrics.MetricError as e:
            raise ExternalError(f"site sample {ext.path}: {e}") from None
        profile[model] = {"threshold": point.served_threshold, "platt": point.platt,
                          "on_sample": metrics.summary(y, metrics.apply_platt(p, point.platt), point.served_threshold),
                          "point": point.row()}
    storage.write_json(storage.join(sdir, "sites", f"{name}.json"), profile)
    return profile
