"""Subgroup results: does each arm perform, and does the verdict between arms hold, within every
level of a metadata column (sex, view, age band, site)? Clinical AI reporting guidelines (CLAIM 2020,
TRIPOD+AI 2024) ask for them: a good overall AUROC can hide a subgroup the model fails.

For each set a study scores (the internal test split, every external set) and each column the spec
names (``subgroups``; ``age_band`` is derived from ``age`` by ``age_bands``), every level is a
subgroup. It is scored when it holds at least ``subgroup_min`` images and both classes, else shown as
"too few". Scored, each arm gets AUROC, sensitivity and specificity, the mean over its final seeds,
each run at its own validation-chosen threshold, exactly as summary.csv is computed, with 95% CIs
from the set's one patient-resample matrix (``metrics.resample_counts``) restricted to the
subgroup's images: the same draws as every other table of the set, so differences are paired.
Every arm is compared with the arm the set's comparison.csv compares against, by the same paired
bootstrap of the AUROC difference, Holm-adjusted over the subgroups (one family per comparison);
the verdict holds in a subgroup when its verdict there is the overall one.

Writes ``subgroups.csv`` and ``subgroup_comparison.csv`` beside the set's summary.csv. A column a set
does not record gets "not recorded" rows; one that no set records is an error before training.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from . import evaluation, metrics, storage
from .data import RESERVED_COLUMNS
from .errors import CxrError

METRICS = ("auroc", "sensitivity", "specificity")
LABELS = {"auroc": "AUROC", "sensitivity": "sensitivity", "specificity": "specificity"}
AGE, AGE_BAND = "age", "age_band"
OVERALL = "all"  # the column and level of each arm's row over the whole set
SCORED, TOO_FEW, NOT_RECORDED = "scored", "too few", "not recorded"
MISSING = "missing"  # the level of an image whose value is blank
TABLE, COMPARISON = "subgroups.csv", "subgroup_comparison.csv"
TABLE_COLUMNS = ["set", "column", "level", "arm", "seeds", "n_images", "n_patients", "positives", "status",
                 *[f"{m}{suffix}" for m in METRICS for suffix in ("", "_lo", "_hi")]]
COMPARISON_COLUMNS = ["set", "column", "level", "arm", "versus", "n_images", "status", "delta_auroc", "delta_lo",
                      "delta_hi", "p", "p_holm", "verdict", "overall_verdict", "holds"]


class SubgroupError(CxrError, ValueError):
    """A subgroup column that no set records; the message names it and what the sets do record."""


# ----------------------------------------------------------------------------- levels

def band_labels(bands: list) -> list[str]:
    """'[18, 40)' for each band; the last one closed: '[65, 120]'."""
    edges = [f"{b:g}" for b in bands]
    return [f"[{lo}, {hi})" for lo, hi in zip(edges[:-2], edges[1:-1])] + [f"[{edges[-2]}, {edges[-1]}]"]


def age_band(ages, bands: list) -> np.ndarray:
    """Each age's band label; a blank or non-numeric age is 'missing', one outside the bands says so."""
    a = pd.to_numeric(pd.Series(ages), errors="coerce").to_numpy(dtype=float)
    labels = np.array(band_labels(bands) + [f"outside [{bands[0]:g}, {bands[-1]:g}]", MISSING], dtype=object)
    which = np.searchsorted(np.asarray(bands, dtype=float), a, side="right") - 1
    which[a == bands[-1]] = len(bands) - 2  # the last band includes its upper edge
    which[(which < 0) | (which >= len(bands) - 1)] = len(bands) - 1
    which[np.isnan(a)] = len(bands)
    return labels[which]


def recorded(column: str, columns: Iterable[str]) -> bool:
    columns = set(columns)
    return column in columns or (column == AGE_BAND and AGE in columns)


def levels(index: pd.DataFrame, column: str, bands: list) -> tuple[np.ndarray, list[str]] | None:
    """Each image's level of ``column`` and the levels in display order (age bands in age order, every
    band shown; other values sorted, 'missing' last), or None when the set does not record it."""
    if not recorded(column, index.columns):
        return None
    if column == AGE_BAND:
        values = age_band(index[AGE], bands)
        order = band_labels(bands) + [v for v in dict.fromkeys(values) if v not in band_labels(bands)]
        return values, sorted(order, key=lambda v: v == MISSING)
    raw = index[column]
    values = np.where(raw.isna(), MISSING, raw.astype(str)).astype(object)
    return values, sorted(set(values), key=lambda v: (v == MISSING, v))


def check_columns(columns: list[str], sets: dict[str, Iterable[str]]) -> dict[str, list[str]]:
    """Raise SubgroupError naming a subgroup column that no set records (a typo, or data without it);
    return, per set, the columns it lacks (reported as 'not recorded' there)."""
    sets = {name: list(cols) for name, cols in sets.items()}
    for column in columns:
        if not any(recorded(column, cols) for cols in sets.values()):
            have = sorted({c for cols in sets.values() for c in cols if c not in RESERVED_COLUMNS})
            raise SubgroupError(f"subgroups: no set records a column {column!r}"
                                + (f" (needs {AGE!r})" if column == AGE_BAND else "")
                                + f"; the sets ({', '.join(sets)}) record: {', '.join(have) or 'no metadata'}")
    return {name: [c for c in columns if not recorded(c, cols)] for name, cols in sets.items()}


# ----------------------------------------------------------------------------- scoring

def score(spec, set_name: str, index: pd.DataFrame, runs: dict, probs: dict,
          comparison: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(subgroups table, subgroup comparison) of one set. ``index``: the set's label, patient and
    metadata columns, row-aligned with every run's raw probabilities in ``probs``; ``runs``: each
    (arm, seed)'s operating point (evaluation.Run); ``comparison``: the set's comparison.csv table
    (who is compared with whom, and the overall verdicts)."""
    y, patients = index["label"].to_numpy().astype(int), index["patient"].to_numpy()
    counts = metrics.resample_counts(patients, spec.final.bootstrap, spec.seed)  # the set's own draws
    served = {k: runs[k].served(p) for k, p in sorted(probs.items())}
    arms = [a for a in spec.arm_names if any(k[0] == a for k in served)]
    seeds = {a: [k for k in served if k[0] == a] for a in arms}
    has_cmp = comparison is not None and len(comparison) > 0
    versus = comparison["versus"].iat[0] if has_cmp else None
    overall = dict(zip(comparison["arm"], comparison["verdict"])) if has_cmp else {}

    groups = [(OVERALL, OVERALL, np.ones(len(y), bool))]
    for column in spec.subgroups:
        found = levels(index, column, spec.age_bands)
        if found is None:
            groups.append((column, "", None))
        else:
            groups += [(column, level, found[0] == level) for level in found[1]]

    rows, compared = [], []
    for column, level, mask in groups:
        base = {"set": set_name, "column": column, "level": level}
        if mask is None:
            rows += [base | {"arm": a, "seeds": len(seeds[a]), "n_images": len(y), "status": NOT_RECORDED}
                     for a in arms]
            continue
        n_pos = int(y[mask].sum())
        size = {"n_images": int(mask.sum()), "n_patients": int(pd.unique(patients[mask]).size), "positives": n_pos}
        ok = mask.sum() >= spec.subgroup_min and 0 < n_pos < mask.sum()
        status = SCORED if ok or column == OVERALL else TOO_FEW
        stats = evaluation.SetMetrics(y[mask], counts[:, mask]) if status == SCORED else None
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample may draw none of a subgroup's images
            for key, p in served.items() if stats else ():
                stats.add(key, p[mask], runs[key].threshold)
        for a in arms:
            row = base | {"arm": a, "seeds": len(seeds[a])} | size | {"status": status}
            for m in METRICS if stats else ():
                ci = stats.with_ci(seeds[a], m)
                row |= {m: ci[m], f"{m}_lo": ci[f"{m}_ci_low"], f"{m}_hi": ci[f"{m}_ci_high"]}
            rows.append(row)
        if column == OVERALL or versus not in seeds:
            continue
        for a in arms:
            if a == versus:
                continue
            row = base | {"arm": a, "versus": versus, "n_images": size["n_images"], "status": status,
                          "overall_verdict": overall.get(a)}
            if stats:
                point, values = stats.mean(seeds[a], "auroc")
                best_point, best_values = stats.mean(seeds[versus], "auroc")
                boot = metrics.paired_difference(point - best_point, values - best_values)
                row |= {"delta_auroc": boot["difference"], "delta_lo": boot["ci_low"], "delta_hi": boot["ci_high"],
                        "p": boot["p_value"]}
            compared.append(row)
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    return table, holm_verdicts(pd.DataFrame(compared, columns=COMPARISON_COLUMNS))


def holm_verdicts(compared: pd.DataFrame) -> pd.DataFrame:
    """Holm over the scored subgroups of each comparison (arm vs versus), then each subgroup's verdict
    in comparison.csv's words, and whether it is the overall one."""
    scored = compared["status"] == SCORED
    for _, g in compared[scored].groupby("arm"):
        compared.loc[g.index, "p_holm"] = evaluation.holm(g["p"].tolist())
    significant = scored & (compared["p_holm"] < evaluation.ALPHA)
    words = np.where(compared["delta_auroc"] < 0, "worse than ", "better than ") + compared["versus"].astype(str)
    compared["verdict"] = np.where(scored, np.where(significant, words, "no significant difference"), None)
    compared["holds"] = np.where(scored, compared["verdict"] == compared["overall_verdict"], None)
    return compared


def write(spec, out: str, set_name: str, index: pd.DataFrame, runs: dict, probs: dict,
          comparison: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Score one set's subgroups (see ``score``) and write them to ``out``; nothing when the spec names none."""
    if not spec.subgroups:
        return None
    table, compared = score(spec, set_name, index.reset_index(drop=True), runs, probs, comparison)
    storage.write_csv(storage.join(out, TABLE), table)
    storage.write_csv(storage.join(out, COMPARISON), compared)
    return table, compared


# ----------------------------------------------------------------------------- words

def below_overall(table: pd.DataFrame, arm: str) -> list[str]:
    """The scored subgroups of ``arm`` whose 95% CI of a metric lies wholly below the arm's overall
    estimate on the set, in words: 'view AP: sensitivity 0.612 (0.501-0.700), overall 0.850'."""
    mine = table[table["arm"] == arm]
    whole = mine[mine["column"] == OVERALL]
    if whole.empty:
        return []
    out = []
    for r in mine[(mine["status"] == SCORED) & (mine["column"] != OVERALL)].itertuples():
        for m in METRICS:
            estimate = whole[m].iat[0]
            if getattr(r, f"{m}_hi") < estimate:
                out.append(f"{r.column} {r.level}: {LABELS[m]} {getattr(r, m):.3f} ({getattr(r, f'{m}_lo'):.3f}-"
                           f"{getattr(r, f'{m}_hi'):.3f}), overall {estimate:.3f}")
    return out


def verdict_text(table: pd.DataFrame, compared: pd.DataFrame | None, arm: str, where: str) -> str:
    """One set's subgroup findings for the study's chosen ``arm``: the subgroups whose CI lies wholly
    below its overall estimate, and the subgroups where the verdict between arms does not hold."""
    mine = table[(table["arm"] == arm) & (table["column"] != OVERALL)]
    scored, few = int((mine["status"] == SCORED).sum()), int((mine["status"] == TOO_FEW).sum())
    lacking = sorted(set(mine.loc[mine["status"] == NOT_RECORDED, "column"]))
    text = f"Subgroups of {where} ({scored} scored, {few} with too few images or a single class): "
    low = below_overall(table, arm)
    text += (f"for {arm}, the 95% CI lies wholly below its overall estimate in " + "; ".join(low) + "."
             if low else f"no subgroup's 95% CI for {arm} lies wholly below its overall estimate.")
    scored_cmp = compared[compared["status"] == SCORED] if compared is not None and len(compared) else None
    if scored_cmp is not None and len(scored_cmp):
        differ = scored_cmp[scored_cmp["holds"].astype(str) == "False"]
        unconfirmed = differ[differ["verdict"] == "no significant difference"]
        contradicted = differ[differ["verdict"] != "no significant difference"]
        text += f" The verdict between arms holds in {len(scored_cmp) - len(differ)} of {len(scored_cmp)} subgroup " \
                f"comparisons (paired bootstrap, Holm-adjusted over subgroups)."
        if len(contradicted):
            text += " It is contradicted in: " + "; ".join(
                f"{r.column} {r.level} ({r.arm} {r.verdict}, overall {r.overall_verdict})"
                for r in contradicted.itertuples()) + "."
        if len(unconfirmed):
            text += (" It is not confirmed (no significant difference in a subgroup smaller than the set) in: "
                     + "; ".join(f"{r.column} {r.level} ({r.arm} vs {r.versus})" for r in unconfirmed.itertuples())
                     + ".")
    if lacking:
        text += f" Not recorded for this set: {', '.join(lacking)}."
    return text


def verdict_sentence(tables: dict[str, pd.DataFrame], arm: str) -> str:
    """The report verdict's sentence: every subgroup, on any set, whose CI for ``arm`` lies wholly
    below the arm's overall estimate on that set."""
    low = [f"{name}: {finding}" for name, t in tables.items() for finding in below_overall(t, arm)]
    if not low:
        return (f"In no subgroup ({', '.join(tables)}) does a 95% CI of {arm}'s AUROC, sensitivity or specificity "
                f"lie wholly below its estimate on the whole set.")
    return f"Subgroups where a 95% CI of {arm} lies wholly below its estimate on the whole set: " + "; ".join(low) + "."


def as_read(table: pd.DataFrame) -> pd.DataFrame:
    """A subgroups file as read back from CSV, with its levels as text again (a blank level reads as NaN)."""
    return table.assign(level=table["level"].fillna("").astype(str))


def study_sentence(sdir: str, arm: str) -> str:
    """``verdict_sentence`` over every subgroups.csv a study wrote (test, then each external set)."""
    found = {"test": storage.join(sdir, TABLE)}
    found |= {name: storage.join(sdir, "external", name, TABLE)
              for name in storage.listdir(storage.join(sdir, "external"))}
    return verdict_sentence({name: as_read(storage.read_csv(uri)) for name, uri in found.items()
                             if storage.exists(uri)}, arm)


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """subgroups.csv as the report shows it: one row per subgroup and arm, each metric with its CI."""
    shown = table[table["status"] != NOT_RECORDED]
    rows = []
    for r in shown.itertuples():
        row = {"column": r.column, "level": r.level, "arm": r.arm, "images": r.n_images, "patients": r.n_patients,
               "positives": r.positives, "status": r.status}
        for m in METRICS:
            value = {m: getattr(r, m), f"{m}_ci_low": getattr(r, f"{m}_lo"), f"{m}_ci_high": getattr(r, f"{m}_hi")}
            row[m] = evaluation.ci_text(value, m) if r.status == SCORED else "–"
        rows.append(row)
    return pd.DataFrame(rows).rename(columns={"auroc": "AUROC"})


def readable_comparison(compared: pd.DataFrame) -> pd.DataFrame:
    """subgroup_comparison.csv as the report shows it (scored subgroups only)."""
    shown = compared[compared["status"] == SCORED]
    return pd.DataFrame({"column": shown["column"], "level": shown["level"], "arm": shown["arm"],
                         "versus": shown["versus"],
                         "AUROC difference (95% CI)": [f"{d:+.3f} ({lo:+.3f} to {hi:+.3f})" for d, lo, hi in
                                                       zip(shown["delta_auroc"], shown["delta_lo"], shown["delta_hi"])],
                         "p_holm": shown["p_holm"], "verdict": shown["verdict"], "overall verdict":
                         shown["overall_verdict"], "holds": shown["holds"].astype(str) == "True"})
