"""``cxr-ray compare A B [C ...]``: finished studies side by side, and their winners tested on the same images.

Looking at two reports cannot say whether study B's winner is better than study A's: their test sets
may differ, and two CIs that overlap do not make a paired test. This page does what the reports cannot:
  - what differs between the specs (data, image size, model options, search space, budget, seeds);
  - each study's verdict, and arm by arm its internal and external metrics side by side with CIs;
  - the served winners (best.json's arm and seed) on the images the studies hold out in common: every
    set of the first study (its test split, its external sets) against every set of another study that
    holds the same images by content (the source file's SHA-1; a synthetic drawing's seed, site and
    name, which do not depend on the image size), compared with the paired patient bootstrap of the
    AUROC difference and DeLong's test, Holm-adjusted over every comparison of the page. The
    probabilities are the ones each study stored for its served model (``predictions.csv``: scored
    once, at the study's own image size and operating point), so nothing is scored twice;
  - cost: AUROC against search compute-seconds (budget.csv), parameters, and inference speed measured
    here on a short fixed batch (torch is imported only for that);
  - per arm, the spread of validation AUROC over its search configurations: how much tuning bought.

Everything else reads the study directories only (``results.Study``); the page is rendered by the
study report's own renderer, into ``--out`` (default ``compare/<a>-vs-<b>``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time

import numpy as np
import pandas as pd

from . import evaluation, figures, metrics, report, storage, synthetic
from .errors import CxrError
from .report import Block, guarded
from .results import Missing, Study
from .study_layout import SEARCH, finished_study

SPEED_BATCH, SPEED_SECONDS = 32, 0.5  # images per forward pass; time at least this long per model


class CompareError(CxrError, ValueError):
    """Studies that cannot be compared; the message names them."""


# ----------------------------------------------------------------------------- the studies

def load(study_dirs: list[str]) -> list[Study]:
    """The finished studies, each read once; a one-line CompareError (or NotAStudy) otherwise."""
    if len(study_dirs) < 2:
        given = study_dirs[0] if study_dirs else "none"
        raise CompareError(f"compare needs two or more finished studies, got one ({given}); for one study, read its "
                           "report (cxr-ray report DIR)")
    sdirs = [finished_study(d) for d in study_dirs]
    repeated = sorted({d for d in sdirs if sdirs.count(d) > 1})
    if repeated:
        raise CompareError(f"{repeated[0]} is given twice: compare different studies")
    return [Study(d) for d in sdirs]


def labels(studies: list[Study]) -> list[str]:
    """A short name per study: its directory's name, or the whole path when two names collide."""
    names = [os.path.basename(s.dir.rstrip("/")) for s in studies]
    return names if len(set(names)) == len(names) else [s.dir for s in studies]


def default_out(studies: list[Study]) -> str:
    return os.path.join("compare", "-vs-".join(os.path.basename(s.dir.rstrip("/")) for s in studies))


# ----------------------------------------------------------------------------- images by content

def content_keys(index: pd.DataFrame, described: dict) -> pd.Series:
    """Each image's identity across studies: the SHA-1 of its source file, except for synthetic drawings,
    whose pixels (and so SHA-1) depend on the image size: (generator, seed, site shift, item name)
    names the same drawing at any size."""
    if described.get("source") != "synthetic":
        return index["sha1"].astype(str)
    tag = f"synthetic-v{synthetic.GENERATOR_VERSION}-{described.get('seed', 0)}-{described.get('shift', 0.0):g}:"
    return tag + index["item"].astype(str)


def held_out_sets(s: Study) -> dict[str, pd.DataFrame]:
    """Set name -> the served model's scores on it: key, label, patient, probability, threshold; the
    test split first, then each external set (only images the study scored: byte-identical copies of
    its own images are not external and were left out)."""
    sets = [("test", s.predictions, "split.csv", {"source": s.spec.data.source, "seed": 0, "shift": 0.0})]
    for name, ext in s.externals.items():
        src = (ext.audit or {}).get("set", {})
        sets.append((name, ext.predictions, f"external/{name}/index.csv",
                     {"source": src.get("source"), "seed": src.get("synthetic_seed"),
                      "shift": src.get("synthetic_shift") or 0.0}))
    out = {}
    for name, predictions, listing, described in sets:
        uri = storage.join(s.dir, listing)
        if predictions is None or predictions.empty or not storage.exists(uri):
            continue
        index = storage.read_csv(uri, dtype={"item": str, "sha1": str})
        keys = dict(zip(index["item"], content_keys(index, described)))
        mine = predictions[(predictions["arm"] == s.best["arm"]) & (predictions["seed"] == s.best["seed"])]
        scored = mine.assign(key=mine["item"].astype(str).map(keys)).dropna(subset=["key"])
        out[name] = scored.drop_duplicates("key")[["key", "label", "patient", "probability", "threshold"]]
    return out


def fingerprint(keys) -> str:
    """One hash of a set's images by content: equal for two sets exactly when they hold the same images."""
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the winners, paired

def paired(a: pd.DataFrame, b: pd.DataFrame, n_bootstrap: int, seed: int) -> dict | None:
    """The served models of two studies on the images both hold out (matched by content key), with the
    paired patient bootstrap of the AUROC difference (b - a) and DeLong's test; None without common
    images of both classes. Images whose labels disagree between the studies are left out (counted)."""
    both = a.merge(b, on="key", suffixes=("_a", "_b"))
    agree = both["label_a"] == both["label_b"]
    both = both[agree]
    y = both["label_a"].to_numpy(int)
    if len(set(y)) < 2:
        return None
    counts = metrics.resample_counts(both["patient_a"].astype(str).to_numpy(), n_bootstrap, seed)
    ones = np.ones((1, len(y)))
    score = {}
    for side in ("a", "b"):
        p, t = both[f"probability_{side}"].to_numpy(float), float(both[f"threshold_{side}"].iloc[0])
        score[side] = (metrics.resampled(y, p, t, ones), metrics.resampled(y, p, t, counts), p)
    point = {m: (float(score["a"][0][m][0]), float(score["b"][0][m][0])) for m in ("auroc", "accuracy")}
    boot = metrics.paired_difference(point["auroc"][1] - point["auroc"][0],
                                     score["b"][1]["auroc"] - score["a"][1]["auroc"])
    auroc_ci = {side: metrics.percentile_ci(score[side][1]["auroc"]) for side in ("a", "b")}
    return {"images": len(y), "patients": int(both["patient_a"].nunique()), "labels_disagree": int((~agree).sum()),
            "auroc_a": point["auroc"][0], "auroc_a_ci": auroc_ci["a"], "auroc_b": point["auroc"][1],
            "auroc_b_ci": auroc_ci["b"], "accuracy_a": point["accuracy"][0], "accuracy_b": point["accuracy"][1],
            "delta_auroc": boot["difference"], "delta_ci_low": boot["ci_low"], "delta_ci_high": boot["ci_high"],
            "p_bootstrap": boot["p_value"], "p_delong": metrics.delong(y, score["b"][2], score["a"][2])["p_value"]}


def winners(studies: list[Study], names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(each study's held-out sets with their fingerprints, the paired comparisons). Every other study's
    winner against the first study's, on every pair of sets holding common images; Holm over all rows.
    The bootstrap takes the first study's resample count and seed."""
    sets = [held_out_sets(s) for s in studies]
    inventory = pd.DataFrame([{"study": n, "set": name, "images": len(t), "patients": t["patient"].nunique(),
                               "fingerprint": fingerprint(t["key"])}
                              for n, mine in zip(names, sets) for name, t in mine.items()])
    ref, n_boot, seed = sets[0], studies[0].spec.final.bootstrap, studies[0].spec.seed
    rows = []
    for s, n, mine in zip(studies[1:], names[1:], sets[1:]):
        for name_a, a in ref.items():
            for name_b, b in mine.items():
                found = paired(a, b, n_boot, seed)
                if found is None:
                    continue
                where = name_a if name_a == name_b else f"{names[0]} {name_a} = {n} {name_b}"
                rows.append({"set": where, "study": n, "versus": names[0],
                             "winner": f"{s.best['arm']} seed {s.best['seed']}",
                             "versus_winner": f"{studies[0].best['arm']} seed {studies[0].best['seed']}",
                             "same_fingerprint": fingerprint(a["key"]) == fingerprint(b["key"]), **found})
    table = pd.DataFrame(rows)
    if len(table):
        table["p_holm"] = evaluation.holm(table["p_bootstrap"].tolist())
        table["significant"] = table["p_holm"] < evaluation.ALPHA
    return inventory, table


def winner_sentence(r, n_bootstrap: int) -> str:
    """One paired comparison in words."""
    numbers = (f"AUROC {r.auroc_b:.3f} vs {r.auroc_a:.3f}, difference {r.delta_auroc:+.3f} (95% CI "
               f"{r.delta_ci_low:+.3f} to {r.delta_ci_high:+.3f}, Holm-adjusted "
               f"{evaluation.p_text(r.p_holm, n_bootstrap)}; DeLong p = {r.p_delong:.2g}) on {r.images} common "
               f"images of {r.patients} patients"
               + (f", {r.labels_disagree} whose labels disagree left out" if r.labels_disagree else ""))
    if r.significant:
        better = "better" if r.delta_auroc > 0 else "worse"
        return f"Study {r.study}'s winner is {better} than {r.versus}'s on {r.set}: {numbers}."
    return f"Study {r.study}'s winner cannot be told apart from {r.versus}'s on {r.set}: {numbers}."


def no_common_images(study: str, versus: str) -> str:
    return (f"No common images: {study} and {versus} share no held-out image (no test split and no external set "
            f"holds the same images by content), so their winners cannot be compared on the same images, and a "
            f"difference between their metrics below is not a test. Name the same external set in both "
            f"(external: in the spec, or cxr-ray evaluate DIR --external NAME=PATH) to compare them.")


def verdict_sentences(table: pd.DataFrame, names: list[str], n_bootstrap: int) -> list[str]:
    """One sentence per paired comparison, and one per study that shares no held-out image with the first."""
    tested = set(table["study"]) if len(table) else set()
    return ([winner_sentence(r, n_bootstrap) for r in table.itertuples()]
            + [no_common_images(n, names[0]) for n in names[1:] if n not in tested])


# ----------------------------------------------------------------------------- specs

def flat(value, prefix: str = "") -> dict[str, str]:
    """A spec as dotted keys, arms and external sets by name (arms.resnet18.pretrained)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        value = {v["name"]: {k: x for k, x in v.items() if k != "name"} for v in value}
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): str(value)}


def spec_diff(studies: list[Study], names: list[str]) -> tuple[pd.DataFrame, int]:
    """The settings whose values differ between the specs (absent: –), and how many are equal."""
    specs = [flat(s.spec.raw) for s in studies]
    keys = list(dict.fromkeys(k for f in specs for k in f))
    differ = [k for k in keys if len({f.get(k) for f in specs}) > 1]
    table = pd.DataFrame([{"section": k.split(".")[0], "setting": k,
                           **{n: f.get(k, "–") for n, f in zip(names, specs)}} for k in differ])
    return table, len(keys) - len(differ)


def positive_classes(s: Study) -> str:
    d = s.spec.data
    return ", ".join(map(str, d.positive)) if d.source == "manifest" else "PNEUMONIA (the source's folders or labels)"


def spec_blocks(studies: list[Study], names: list[str]) -> list[Block]:
    table, same = spec_diff(studies, names)
    blocks = [Block("table", f"What differs between the specs (spec.yaml of each study; {same} other settings are "
                             f"equal). Spec hashes: " + ", ".join(f"{n} {s.spec_hash}" for n, s in zip(names, studies))
                    + ".", "spec_diff", table) if len(table) else
              Block("text", f"The specs are identical ({same} settings; spec hash {studies[0].spec_hash}).")]
    sizes = {s.spec.data.image_size for s in studies}
    if len(sizes) > 1:
        blocks.append(Block("text", "The studies ran at different image sizes (" + ", ".join(
            f"{n} {s.spec.data.image_size} px" for n, s in zip(names, studies)) + "): allowed. Each winner was scored "
            "at its own size; common images are matched by their source content, not by their pixels."))
    positives = {positive_classes(s) for s in studies}
    if len(positives) > 1:
        blocks.append(Block("warn", "The studies call different label values positive (" + "; ".join(
            f"{n}: {positive_classes(s)}" for n, s in zip(names, studies)) + "). Their metrics measure the same "
            "finding only if these values mean the same thing; on a common image whose labels disagree, the "
            "image is left out of the paired test."))
    if any((s.data_report or {}).get("source") == "synthetic" or s.spec.data.source == "synthetic" for s in studies):
        blocks.append(Block("warn", "SYNTHETIC DEMO DATA, NOT MEDICAL DATA in at least one study: nothing here says "
                                    "anything about chest X-rays or patients."))
    return blocks


# ----------------------------------------------------------------------------- arm by arm

def arm_tables(studies: list[Study], names: list[str]) -> list[Block]:
    """Per held-out set (by name), each arm's mean over final seeds with 95% CIs, one column per study."""
    sets = {"test": [s.summary for s in studies]}
    for name in dict.fromkeys(n for s in studies for n in s.externals):
        sets[name] = [s.externals[name].summary if name in s.externals else None for s in studies]
    arms = list(dict.fromkeys(a for s in studies for a in s.arms))
    blocks = []
    for where, summaries in sets.items():
        rows = []
        for arm in arms:
            row = {"arm": arm}
            for n, s, t in zip(names, studies, summaries):
                r = t.set_index("arm").loc[arm] if t is not None and arm in set(t["arm"]) else None
                served = " (served)" if s.best and s.best["arm"] == arm else ""
                for m in ("auroc", "accuracy", "sensitivity", "specificity"):
                    row[f"{n} {report.METRIC_NAMES.get(m, m)}{served if m == 'auroc' else ''}"] = \
                        evaluation.ci_text(r, m) if r is not None else "–"
            rows.append(row)
        what = ("the internal test split (summary.csv)" if where == "test" else
                f"the external set named {where} (external/{where}/summary.csv; by name: the common images are "
                f"tested below)")
        blocks.append(Block("table", f"Each arm on {what}: mean over final seeds at each run's validation-chosen "
                                     f"threshold, 95% patient-bootstrap CI in brackets; – where a study has no such "
                                     f"arm or set.", f"arms_{where}", pd.DataFrame(rows)))
    return blocks


# ----------------------------------------------------------------------------- cost

def inference_speed(s: Study, arm: str) -> tuple[float, str]:
    """Images per second of the arm's final model on this machine (one thread, batches of SPEED_BATCH
    random images at the study's size, timed for at least SPEED_SECONDS after a warm-up batch), or NaN
    and why not."""
    if s.final is None or arm not in set(s.final["arm"]):
        return float("nan"), f"{s.why('final.csv')}"
    ckpt = storage.join(s.dir, s.final[s.final["arm"] == arm].iloc[0]["checkpoint"])
    if not storage.exists(storage.join(ckpt, "model.safetensors")):
        return float("nan"), f"no model.safetensors in {ckpt}"
    import torch  # only here: the rest of the page needs neither torch nor Ray

    from . import models
    torch.set_num_threads(1)
    model, meta = models.load_checkpoint(storage.local_dir(ckpt))
    size = int(meta["image_size"])
    images = np.random.default_rng(0).integers(0, 256, (SPEED_BATCH, size, size), dtype=np.uint8)
    rows, norm, device = np.arange(SPEED_BATCH), (meta["mean"], meta["std"]), torch.device("cpu")
    models.predict(model, images, rows, norm, device)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < SPEED_SECONDS or done < 2 * SPEED_BATCH:
        models.predict(model, images, rows, norm, device, batch=SPEED_BATCH)
        done += SPEED_BATCH
    return done / (time.perf_counter() - start), ""


def cost_table(studies: list[Study], names: list[str], measure: bool) -> tuple[pd.DataFrame, str]:
    """Per study and arm: the AUROC the Pareto figure plots (an external set every study holds by name,
    else the internal test split), search compute-seconds, parameters, and measured images/s."""
    shared = [n for n in studies[0].externals if all(n in s.externals for s in studies)]
    where = shared[0] if shared else "test"
    rows = []
    for n, s in zip(names, studies):
        summary = s.externals[where].summary if shared else s.summary
        if summary is None:
            continue
        budget = s.budget.set_index("arm") if s.budget is not None and not s.budget.empty else None
        accel = next((c for c in ("gpu_seconds", "cpu_seconds") if budget is not None and c in budget), None)
        for r in summary.itertuples():
            speed, why = inference_speed(s, r.arm) if measure else (float("nan"), "--no-speed")
            rows.append({"study": n, "arm": r.arm, "auroc": r.auroc, "auroc_ci_low": r.auroc_ci_low,
                         "auroc_ci_high": r.auroc_ci_high,
                         "search_compute_s": float(budget.loc[r.arm, accel]) if accel and r.arm in budget.index
                         else float("nan"), "compute": (accel or "cpu_seconds").split("_")[0].upper(),
                         "parameters_millions": (s.parameters.get(r.arm) or float("nan")) / 1e6,
                         "images_per_s": speed, "speed_note": why})
    return pd.DataFrame(rows), (f"{where} AUROC" if shared else "test AUROC")


def cost_blocks(studies: list[Study], names: list[str], measure: bool) -> list[Block]:
    table, y_label = cost_table(studies, names, measure)
    if table.empty:
        raise Missing("no study has a summary.csv")
    fig, caption = figures.cost_pareto(table, y_label)
    measured = table["images_per_s"].notna()
    note = (f" Inference speed measured by this command on this machine ({os.cpu_count()} cores, one thread, batches "
            f"of {SPEED_BATCH} random images at each study's size, at least {SPEED_SECONDS} s per model after a "
            f"warm-up batch): a machine shared with other work measures less.")
    blocks = [Block("figure", caption + note, "cost_pareto", png=figures.png(fig)),
              Block("table", f"The figure's numbers: {y_label} (mean over final seeds, 95% CI), search compute-seconds "
                             f"(budget.csv), parameters (best_configs.json) and images/s.", "cost",
                    table.drop(columns=["speed_note"]))]
    if not measured.all():
        blocks.append(Block("note", "Images/s not measured for " + "; ".join(
            f"{r.study} {r.arm} ({r.speed_note})" for r in table[~measured].itertuples()) + "."))
    return blocks


# ----------------------------------------------------------------------------- tuning

def tuning_spread(studies: list[Study], names: list[str]) -> pd.DataFrame:
    """Per study and arm, validation AUROC over its search configurations (each trial's last epoch: a trial
    ASHA stopped counts with what it had reached), beside the arm's final test AUROC."""
    rows = []
    for n, s in zip(names, studies):
        t = s.trials
        if t is None or t.empty or "val_auroc" not in t:
            continue
        t = t[t["phase"] == SEARCH] if "phase" in t else t
        last = t.dropna(subset=["epoch", "val_auroc"]).sort_values("epoch").groupby("trial_id").last()
        test = s.summary.set_index("arm")["auroc"] if s.summary is not None else pd.Series(dtype=float)
        for arm, g in last.groupby("arm", sort=False):
            v = g["val_auroc"]
            rows.append({"study": n, "arm": arm, "configurations": len(v), "best": v.max(), "median": v.median(),
                         "worst": v.min(), "best - worst": v.max() - v.min(), "final test AUROC": test.get(arm)})
    if not rows:
        raise Missing("no study has search trials with a validation AUROC (trials.csv)")
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the page

def build(studies: list[Study], measure: bool = True) -> tuple[str, list[tuple[str, list[Block]]], pd.DataFrame]:
    """The page's title and sections, and the paired comparisons of the winners."""
    names = labels(studies)
    n_boot = studies[0].spec.final.bootstrap
    inventory, table = winners(studies, names)

    def verdict() -> list[Block]:
        said = verdict_sentences(table, names, n_boot)
        blocks = [Block("warn" if t.startswith("No common images") else "text", t) for t in said]
        if len(table):
            blocks.append(Block("text", f"Paired patient bootstrap ({n_boot} resamples, seed {studies[0].spec.seed}, "
                                        f"the first study's) of the AUROC difference, Holm-adjusted over "
                                        f"{len(table)} comparison(s), alpha {evaluation.ALPHA}; each winner is the "
                                        f"model its study serves (best.json), at its own image size."))
        return blocks + [Block("text", f"{n}: {s.best.get('verdict', '')}") for n, s in zip(names, studies)]

    def same_images() -> list[Block]:
        blocks = [Block("table", "The images each study held out and its served model scored: the test split and "
                                 "each external set (byte-identical copies of a study's own images left out), with a "
                                 "fingerprint of their content; equal fingerprints, the same images.", "held_out",
                        inventory)]
        if not len(table):
            return blocks + [Block("warn", no_common_images(" and ".join(names[1:]), names[0]))]
        shown = table.assign(**{c: [f"{v:.3f} ({lo:.3f}-{hi:.3f})" for v, (lo, hi) in zip(table[c], table[f"{c}_ci"])]
                                for c in ("auroc_a", "auroc_b")})
        shown = shown.drop(columns=["auroc_a_ci", "auroc_b_ci"]).rename(columns={"auroc_a": "versus AUROC",
                                                                                 "auroc_b": "study AUROC",
                                                                                 "accuracy_a": "versus accuracy",
                                                                                 "accuracy_b": "study accuracy"})
        below = f"< {1 / n_boot:.2g}"
        shown = shown.assign(**{c: [below if p == 0 else p for p in shown[c]] for c in ("p_bootstrap", "p_holm")})
        return blocks + [Block("table", "Each study's served model against the first study's on the images both hold "
                                        "out (delta: study minus versus; AUROC with 95% patient-bootstrap CI; accuracy "
                                        "at each model's own threshold).", "winners", shown)]

    sections = [("Verdict", verdict), ("What differs", lambda: spec_blocks(studies, names)),
                ("Winners on the same images", same_images), ("Arm by arm", lambda: arm_tables(studies, names)),
                ("Cost", lambda: cost_blocks(studies, names, measure)),
                ("What tuning bought", lambda: [Block(
                    "table", "Validation AUROC over each arm's search configurations (trials.csv: each trial's "
                             "last epoch, so a trial ASHA stopped early counts with what it had reached). A wide "
                             "spread says much of the arm's result is its tuning; the final test AUROC is the "
                             "retrained best configuration's.", "tuning", tuning_spread(studies, names))])]
    title = "Studies compared: " + " vs ".join(names)
    return title, [(t, guarded(t, f)) for t, f in sections], table


def write(study_dirs: list[str], out: str | None = None, measure: bool = True) -> tuple[str, pd.DataFrame, list[str]]:
    """Write the page (index.html, report.md, every figure as PNG and table as CSV) to ``out``, replaced whole;
    returns its index.html, the paired comparisons and the verdict sentences."""
    studies = load(study_dirs)
    out = out or default_out(studies)
    title, sections, table = build(studies, measure)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".compare-", dir=os.path.dirname(os.path.abspath(out)))
    try:
        for name, data in report.page_files(title, sections).items():
            with open(os.path.join(scratch, name), "wb") as fh:
                fh.write(data)
        os.chmod(scratch, 0o755)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    said = verdict_sentences(table, labels(studies), studies[0].spec.final.bootstrap)
    return os.path.join(out, "index.html"), table, said
