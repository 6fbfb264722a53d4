"""The model card of a study's served model (report/model_card.json and model_card.md): intended use,
training data, how the model was selected, its internal and external metrics with confidence
intervals, subgroup results, known limits and the spec hash, as clinical AI reporting guidelines
(CLAIM 2020, TRIPOD+AI 2024) ask of a validation study.

Built from the study directory alone (``results.Study``: no torch, no Ray) by the report step, and
read back by the server for GET /v1/model/card. The JSON holds no NaN (undefined values are null).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pandas as pd

from . import metrics, storage, subgroups as subgroup_results
from .data import CLASSES, SPLIT_ORDER
from .results import Study

CARD_VERSION = 1
INTENDED_USE = ("Research on chest X-ray pneumonia classification: comparing backbones and studying how a "
                "classifier behaves on data like its test and external sets. Not a medical device: not for "
                "diagnosis, triage or any decision about a patient, and not validated prospectively.")
OUT_OF_SCOPE = ["clinical diagnosis or screening", "images unlike the training data (other modality, "
                "projection, age group or acquisition) unless checked on such data first",
                "findings other than pneumonia: the model answers NORMAL or PNEUMONIA only"]
SHORTCUT_AUROC = 0.6  # the films' shape alone tells the classes apart at least this well: a shortcut to name


def clean(value):
    """JSON-safe: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def with_ci(row, names=metrics.REPORTED) -> dict:
    """metric -> {value, ci_low, ci_high} from a summary-shaped row."""
    return {m: {"value": row[m], "ci_low": row.get(f"{m}_ci_low"), "ci_high": row.get(f"{m}_ci_high")}
            for m in names if m in row}


def build(s: Study) -> dict:
    """The card of the model the study serves by default (best.json); Missing when none is chosen yet."""
    s.need("best.json", "summary.csv")
    best, spec = s.best, s.spec
    arm = spec.arm(best["arm"])
    summary = s.summary.set_index("arm")
    external = {name: with_ci(ext.summary.set_index("arm").loc[arm.name])
                for name, ext in s.externals.items() if arm.name in set(ext.summary["arm"])}
    card = {
        "card_version": CARD_VERSION,
        "model": {"study": spec.name, "arm": arm.name, "backbone": arm.backbone, "pretrained": arm.pretrained,
                  "seed": best["seed"], "checkpoint": best["checkpoint"], "image_size": spec.data.image_size,
                  "threshold": best["threshold"], "calibrated": bool(best.get("platt")),
                  "operating_point": {**best["policy"], "chosen_on": "the study's validation split"},
                  "spec_hash": s.spec_hash},
        "intended_use": {"use": INTENDED_USE, "out_of_scope": OUT_OF_SCOPE},
        "training_data": training_data(s),
        "selection": selection(s),
        "metrics": {"test": with_ci(summary.loc[arm.name]), "external": external,
                    "served_run_test": served_run_metrics(s),
                    "how": f"test and external: mean over the {int(summary.loc[arm.name, 'seeds'])} final seed(s) "
                           f"of {arm.name}, each at its validation-chosen threshold, with 95% patient-bootstrap "
                           f"CIs ({spec.final.bootstrap} resamples); served_run_test: the served seed alone"},
        "subgroups": subgroups(s, arm.name),
        "limits": limits(s, arm.name, external),
        "spec_hash": s.spec_hash,
    }
    return clean(card)


def training_data(s: Study) -> dict:
    dr = s.data_report or {}
    out = {"source": dr.get("source", s.spec.data.source), "path": dr.get("path", s.spec.data.path),
           "notes": dr.get("notes", []), "split_level": dr.get("split_level", "patient"),
           "images": dr.get("images"), "patients": dr.get("patients")}
    if s.split is not None and not s.split.empty:
        per_split = {}
        for name in [n for n in SPLIT_ORDER if n in set(s.split["split"])]:
            g = s.split[s.split["split"] == name]
            per_split[name] = {"images": len(g), "patients": int(g["patient"].nunique()),
                               **{c: int((g["label"] == k).sum()) for k, c in enumerate(CLASSES)}}
        out["per_split"] = per_split
    return out


def selection(s: Study) -> dict:
    spec, b = s.spec, s.spec.budget
    return {"arms": [{"name": a.name, "backbone": a.backbone, "pretrained": a.pretrained} for a in spec.arms],
            "matched": not spec.unmatched,
            "budget": {"configurations_per_arm": b.samples_per_arm, "max_epochs": b.max_epochs,
                       "scheduler": f"ASHA within each arm (grace period {b.grace_period}, reduction factor "
                                    f"{b.reduction_factor})"},
            "selection_metric": f"{s.metric} ({s.mode}) on validation",
            "search_seed": spec.seed, "final_seeds": list(spec.final.seeds),
            "threshold_policy": {"policy": spec.threshold.policy, "target": spec.threshold.target},
            "procedure": "Every arm searched the same configurations under the same budget and split; each arm's "
                         "best configuration was retrained with every final seed; the served arm is the one with "
                         "the best test AUROC, and its served seed the one with the best validation AUROC. "
                         "Thresholds and calibration were chosen on validation; test and external sets were scored "
                         "once, afterwards."}


def served_run_metrics(s: Study) -> dict:
    if s.final is None or s.final.empty:
        return {}
    run = s.final[(s.final["arm"] == s.best["arm"]) & (s.final["seed"] == int(s.best["seed"]))]
    return {m: float(run.iloc[0][m]) for m in metrics.REPORTED if m in run} if len(run) else {}


def subgroups(s: Study, arm: str) -> dict:
    """The served arm's subgroup rows of the internal test (subgroups.csv) and each external set
    (external/<name>/subgroups.csv), and those whose CI lies wholly below the arm's estimate on the set."""
    tables = []
    for uri in [storage.join(s.dir, subgroup_results.TABLE)] + [
            storage.join(s.dir, "external", n, subgroup_results.TABLE) for n in s.externals]:
        if storage.exists(uri):
            t = subgroup_results.as_read(storage.read_csv(uri))
            tables.append(t[t["arm"] == arm])
    if not tables:
        return {"analysed": False, "note": "no subgroup analysis: the spec names no subgroups (subgroups: [...])"}
    rows = pd.concat(tables, ignore_index=True)
    shown = rows[(rows["column"] != subgroup_results.OVERALL) & (rows["status"] != subgroup_results.NOT_RECORDED)]
    return {"analysed": True, "rows": shown.to_dict("records"),
            "below_overall": [f"{name}: {finding}" for name, t in rows.groupby("set", sort=False)
                              for finding in subgroup_results.below_overall(t, arm)]}


def limits(s: Study, arm: str, external: dict) -> list[str]:
    """What a reader must know before trusting the numbers, one sentence each."""
    dr, out = s.data_report or {}, []
    if dr.get("source", s.spec.data.source) == "synthetic":
        out.append("SYNTHETIC DEMO DATA: trained and tested on images drawn by cxr_ray.synthetic; nothing here "
                   "describes chest X-rays or patients.")
    if dr.get("split_level") == "image":
        out.append("Image-level split: the source has no patient ids, so one patient's images may sit in train and "
                   "test, which inflates the test metrics.")
    elif dr.get("images_without_patient_id"):
        out.append(f"{dr['images_without_patient_id']} images carry no patient id; each counts as its own patient.")
    aspect = dr.get("aspect_ratio")
    if aspect:
        separation = max(aspect["auroc"], 1 - aspect["auroc"])
        out.append(f"Shortcut check: the films' aspect ratio alone separates the classes with AUROC "
                   f"{separation:.3f} (median width/height " + ", ".join(f"{k} {v}" for k, v in
                                                                       aspect["median_by_class"].items()) + ")"
                   + ("; a model can learn the film's shape instead of the lungs." if separation >= SHORTCUT_AUROC
                      else "; below the level where it would be a usable shortcut."))
    dup = dr.get("duplicates") or {}
    if dup.get("across_classes"):
        out.append(f"{dup['across_classes']} groups of byte-identical images carry both labels in the source.")
    leaks = {k: v["count"] for k, v in (dr.get("leakage_in_source_splits") or {}).items() if v.get("count")}
    if leaks:
        out.append("The source's own splits share " + ", ".join(f"{n} {k} value(s)" for k, n in leaks.items())
                   + "; the study's split keeps them on one side.")
    if not external:
        out.append("Not validated on data collected apart from the training images (no external set): the "
                   "metrics may not transfer to another site.")
    test = s.summary.set_index("arm").loc[arm]
    for name, ext in external.items():
        gap = ext["auroc"]["value"] - test["auroc"]
        if gap < 0:
            out.append(f"On external set {name} the AUROC is {abs(gap):.3f} lower than on the internal test split.")
    for finding in subgroups(s, arm).get("below_overall", []):
        out.append(f"Subgroup {finding}: its 95% CI lies wholly below the estimate on the whole set.")
    if s.spec.unmatched:
        out.append("Unmatched study: the arms ran with different settings, so the choice of backbone is not a fair "
                   "comparison.")
    if s.split is not None and not s.split.empty:
        n_test = int((s.split["split"] == "test").sum())
        out.append(f"The internal test split holds {n_test} images: the CIs above show how much that pins down.")
    return out


# ----------------------------------------------------------------------------- Markdown

def markdown(card: dict) -> str:
    m, data, sel = card["model"], card["training_data"], card["selection"]
    lines = [f"# Model card: {m['arm']} ({m['backbone']}) from study {m['study']}", "",
             f"Spec hash `{card['spec_hash']}`; checkpoint `{m['checkpoint']}` (seed {m['seed']}), "
             f"{m['image_size']} px, threshold {m['threshold']:.3f} on P(pneumonia) "
             f"({policy_words(m['operating_point'])}, chosen on validation"
             f"{', Platt-calibrated' if m['calibrated'] else ''}). A server may use a site profile or another "
             f"policy: GET /v1/model names the operating point in use.", "",
             "## Intended use", "", card["intended_use"]["use"], "", "Out of scope:",
             *[f"- {u}" for u in card["intended_use"]["out_of_scope"]], "",
             "## Training data", "",
             f"Source: {data['source']} ({data['path']}); {data['images']} images, {data['patients']} patients; "
             f"split at {data['split_level']} level.", *[f"- {n}" for n in data["notes"]], ""]
    if data.get("per_split"):
        lines += ["| split | images | patients | " + " | ".join(CLASSES) + " |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['images']} | {v['patients']} | " + " | ".join(str(v[c]) for c in CLASSES) + " |"
                  for k, v in data["per_split"].items()]
        lines.append("")
    b = sel["budget"]
    lines += ["## Selection", "",
              f"Arms: {', '.join(a['name'] for a in sel['arms'])} ({'matched' if sel['matched'] else 'UNMATCHED'}). "
              f"{b['configurations_per_arm']} configurations per arm, up to {b['max_epochs']} epochs, "
              f"{b['scheduler']}; "
              f"selected on {sel['selection_metric']}; search seed {sel['search_seed']}, final seeds "
              f"{', '.join(map(str, sel['final_seeds']))}; threshold policy "
              f"{policy_words(sel['threshold_policy'])}. {sel['procedure']}", "",
              "## Metrics", "", card["metrics"]["how"] + ".", "",
              "| set | " + " | ".join(metrics.REPORTED) + " |", "|---|" + "---|" * len(metrics.REPORTED)]
    for name, values in [("internal test", card["metrics"]["test"]), *card["metrics"]["external"].items()]:
        lines.append(f"| {name} | " + " | ".join(ci_words(values.get(k)) for k in metrics.REPORTED) + " |")
    served = card["metrics"]["served_run_test"]
    if served:
        lines.append(f"| internal test, seed {m['seed']} alone | "
                     + " | ".join(ci_words({"value": served.get(k)}) for k in metrics.REPORTED) + " |")
    lines += ["", "## Subgroups", ""]
    sub = card["subgroups"]
    if not sub["analysed"]:
        lines.append(sub["note"].capitalize() + ".")
    else:
        lines += ["| set | column | level | images | AUROC | sensitivity | specificity |", "|---" * 7 + "|"]
        for r in sub["rows"]:
            lines.append(f"| {r.get('set')} | {r.get('column')} | {r.get('level')} | {r.get('n_images')} | "
                         + " | ".join(range_words(r, k) if r.get("status") == subgroup_results.SCORED else str(r.get("status"))
                                      for k in ("auroc", "sensitivity", "specificity")) + " |")
    lines += ["", "## Known limits", "", *[f"- {x}" for x in card["limits"]], ""]
    return "\n".join(lines)


def policy_words(point: dict) -> str:
    return point["policy"] + (f" {point['target']:g}" if point.get("target") is not None else "")


def ci_words(v: dict | None) -> str:
    if not v or v.get("value") is None:
        return "–"
    if v.get("ci_low") is None:
        return f"{v['value']:.3f}"
    return f"{v['value']:.3f} ({v['ci_low']:.3f}-{v['ci_high']:.3f})"


def range_words(row: dict, m: str) -> str:
    return ci_words({"value": row.get(m), "ci_low": row.get(f"{m}_lo"), "ci_high": row.get(f"{m}_hi")})


def files(s: Study) -> dict[str, bytes]:
    """model_card.json and model_card.md for the report directory."""
    card = build(s)
    return {"model_card.json": json.dumps(card, indent=1, allow_nan=False).encode(),
            "model_card.md": markdown(card).encode()}


# ----------------------------------------------------------------------------- serving

@dataclass(frozen=True)
class Served:
    """The card a server answers GET /v1/model/card with, or why it has none."""
    json: dict | None = None
    markdown: str | None = None
    missing: str = "served from a checkpoint, not a study: there is no model card"


def for_model(sdir: str, identity: dict) -> Served:
    """The study's card, when it describes the served model (the same checkpoint)."""
    uri = storage.join(sdir, "report", "model_card.json")
    if not storage.exists(uri):
        return Served(missing="the study has no model card yet (report/model_card.json); write it with "
                              "`cxr-ray report STUDY`")
    card = storage.read_json(uri)
    if card["model"]["checkpoint"] != identity["checkpoint"]:
        return Served(missing=f"the study's model card describes {card['model']['arm']} seed "
                              f"{card['model']['seed']}, not the served model ({identity['arm']}, "
                              f"{'seed ensemble' if identity['seed'] == -1 else 'seed ' + str(identity['seed'])})")
    return Served(card, storage.read_text(storage.join(sdir, "report", "model_card.md")), "")
