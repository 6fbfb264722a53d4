"""Failure cases and the model card (issue 19 §3-4), over the fake finished study of conftest: the
card's content against the study's own files, the choice of failure cases on hand-made
predictions, grids drawn with the served checkpoint's Grad-CAM from the decoded cache (and kept,
without torch, by a later report), and the report with both sections in headless Chromium."""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import FAKE_BEST_ARM, headless_tab
from cxr_ray import evaluation, failures, model_card, report, spec as specs, storage, synthetic
from cxr_ray.results import Study
from cxr_ray.study_layout import read_spec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXTERNAL = "site2"


# ----------------------------------------------------------------------------- choosing failure cases

def test_most_confident_errors_are_the_highest_scored_normals_and_lowest_scored_pneumonias():
    rows = [  # (item, label, probability); threshold 0.5 for the served run
        ("n1", 0, 0.95), ("n2", 0, 0.55), ("n3", 0, 0.99), ("n4", 0, 0.10), ("n5", 0, 0.50),
        ("p1", 1, 0.05), ("p2", 1, 0.45), ("p3", 1, 0.90), ("p4", 1, 0.01), ("p5", 1, 0.499)]
    mine = pd.DataFrame([{"arm": "a", "seed": 1, "item": i, "patient": i, "label": y, "probability": p,
                          "threshold": 0.5} for i, y, p in rows])
    other = mine.assign(seed=0, probability=1 - mine["probability"])  # another run's errors are not the served one's
    cases = failures.most_confident_errors(pd.concat([other, mine]), "a", 1, n=3)
    assert list(cases["error"]) == ["false positive"] * 3 + ["false negative"] * 3
    assert list(cases["item"]) == ["n3", "n1", "n2", "p4", "p1", "p2"]  # n5 at the threshold is called PNEUMONIA
    assert len(failures.most_confident_errors(mine, "a", 1, n=8)) == 4 + 4  # every error when fewer than n
    with pytest.raises(failures.Missing, match="seed 7"):
        failures.most_confident_errors(mine, "a", 7)


def test_cases_carry_the_items_metadata():
    cases = pd.DataFrame([{"error": "false positive", "item": "x.png", "patient": "P1", "label": 0,
                           "probability": 0.9, "threshold": 0.5}])
    items = pd.DataFrame([{"item": "x.png", "label": 0, "patient": "P1", "sha1": "ab", "split": "test",
                           "sex": "F", "age": 71}, {"item": "y.png", "label": 1, "patient": "P2", "sha1": "cd",
                                                    "split": "test", "sex": "M", "age": 40}])
    out = failures.with_metadata(cases, items)
    assert out.to_dict("records") == [{"error": "false positive", "item": "x.png", "patient": "P1", "label": "NORMAL",
                                       "probability": 0.9, "threshold": 0.5, "sex": "F", "age": 71}]


# ----------------------------------------------------------------------------- the card

def test_card_states_the_served_model_data_metrics_and_hash(fake_study_dir):
    s = Study(str(fake_study_dir))
    card = model_card.build(s)
    best = json.loads((fake_study_dir / "best.json").read_text())
    assert card["model"]["arm"] == FAKE_BEST_ARM == best["arm"] and card["model"]["seed"] == best["seed"]
    assert card["model"]["checkpoint"] == best["checkpoint"] and card["model"]["backbone"] == "densenet121"
    assert card["spec_hash"] == card["model"]["spec_hash"] == specs.yaml_load(
        (fake_study_dir / "spec.yaml").read_text())["spec_hash"]
    assert "not a medical device" in card["intended_use"]["use"].lower()
    split = pd.read_csv(fake_study_dir / "split.csv")
    for name, g in split.groupby("split"):
        assert card["training_data"]["per_split"][name] == {
            "images": len(g), "patients": g["patient"].nunique(),
            "NORMAL": int((g["label"] == 0).sum()), "PNEUMONIA": int((g["label"] == 1).sum())}
    row = pd.read_csv(fake_study_dir / "summary.csv").set_index("arm").loc[FAKE_BEST_ARM]
    for m in ("auroc", "sensitivity", "specificity", "ece"):
        assert card["metrics"]["test"][m] == {"value": pytest.approx(row[m]),
                                              "ci_low": pytest.approx(row[f"{m}_ci_low"]),
                                              "ci_high": pytest.approx(row[f"{m}_ci_high"])}
    final = pd.read_csv(fake_study_dir / "final.csv")
    served = final[(final["arm"] == best["arm"]) & (final["seed"] == best["seed"])].iloc[0]
    assert card["metrics"]["served_run_test"]["auroc"] == pytest.approx(served["auroc"])
    assert card["selection"]["final_seeds"] == [0, 1, 2] and card["selection"]["budget"]["configurations_per_arm"] == 4
    assert card["metrics"]["external"] == {}
    assert not card["subgroups"]["analysed"] and "no subgroup analysis" in card["subgroups"]["note"]
    assert any("SYNTHETIC" in x for x in card["limits"]) and any("no external set" in x for x in card["limits"])
    md = model_card.markdown(card)
    assert md.startswith(f"# Model card: {FAKE_BEST_ARM}") and card["spec_hash"] in md
    assert f"{row['auroc']:.3f} ({row['auroc_ci_low']:.3f}-{row['auroc_ci_high']:.3f})" in md


def test_card_reads_subgroups_and_the_shortcut_probe(fake_study_dir, tmp_path):
    sdir = shutil.copytree(fake_study_dir, tmp_path / "fake")
    overall = pd.read_csv(sdir / "summary.csv").set_index("arm").loc[FAKE_BEST_ARM, "auroc"]
    base = {"set": "test", "column": "sex", "status": "scored", "sensitivity": 0.9, "sensitivity_lo": 0.8,
            "sensitivity_hi": 0.95, "specificity": 0.8, "specificity_lo": 0.7, "specificity_hi": 0.9}
    pd.DataFrame([base | {"level": "F", "arm": FAKE_BEST_ARM, "n_images": 30, "auroc": 0.7, "auroc_lo": 0.6,
                          "auroc_hi": overall - 0.01},
                  base | {"level": "M", "arm": FAKE_BEST_ARM, "n_images": 30, "auroc": 0.99, "auroc_lo": 0.97,
                          "auroc_hi": 1.0},
                  base | {"level": "F", "arm": "effnet", "n_images": 30, "auroc": 0.5, "auroc_lo": 0.4,
                          "auroc_hi": 0.6},
                  base | {"level": "X", "arm": FAKE_BEST_ARM, "n_images": 2, "status": "too few", "auroc": np.nan,
                          "auroc_lo": np.nan, "auroc_hi": np.nan},
                  base | {"column": "view", "level": "", "arm": FAKE_BEST_ARM, "n_images": 0, "status": "not recorded",
                          "auroc": np.nan, "auroc_lo": np.nan, "auroc_hi": np.nan},
                  base | {"column": "all", "level": "all", "arm": FAKE_BEST_ARM, "n_images": 60, "auroc": overall,
                          "auroc_lo": overall - 0.05, "auroc_hi": overall + 0.02}]).to_csv(sdir / "subgroups.csv",
                                                                                           index=False)
    dr = json.loads((sdir / "data_report.json").read_text())
    dr["aspect_ratio"] = {"median_by_class": {"NORMAL": 1.21, "PNEUMONIA": 1.02}, "auroc": 0.18}
    (sdir / "data_report.json").write_text(json.dumps(dr))
    card = model_card.build(Study(str(sdir)))
    assert card["subgroups"]["analysed"] and [r["level"] for r in card["subgroups"]["rows"]] == ["F", "M", "X"]
    assert card["subgroups"]["rows"][2]["auroc"] is None  # JSON: no NaN
    json.dumps(card, allow_nan=False)
    below = [x for x in card["limits"] if x.startswith("Subgroup")]
    assert len(below) == 1 and "test: sex F: AUROC 0.700" in below[0]  # only the served arm's, below its overall AUROC
    assert any("aspect ratio alone separates the classes with AUROC 0.820" in x for x in card["limits"])
    md = model_card.markdown(card)
    assert "| test | sex | X | 2 | too few |" in md


# ----------------------------------------------------------------------------- grids from the cache

@pytest.fixture(scope="module")
def drawn(fake_study_dir, tmp_path_factory) -> Path:
    """The fake study with what grids need: the served run's checkpoint with real weights (a random
    lcnet_050: Grad-CAM needs no skill), the decoded images of its test split and of an external set
    in caches the study recorded, and that external set scored; its report written once."""
    import torch

    from cxr_ray import config, models, training
    sdir = shutil.copytree(fake_study_dir, tmp_path_factory.mktemp("card") / "fake")
    spec = read_spec(str(sdir))
    size = spec.data.image_size
    best = json.loads((sdir / "best.json").read_text())
    torch.manual_seed(0)
    cfg = config.TrainConfig(backbone="lcnet_050", image_size=size, study="fake", arm=best["arm"],
                             spec_hash=spec.hash)
    model = models.build_model(cfg.backbone, image_size=size).eval()
    opt = training.make_optimizer(model, cfg)
    models.save_checkpoint(sdir / best["checkpoint"], model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1),
                           4, cfg, models.normalization(cfg.backbone), {"threshold": best["threshold"]})

    def cache(name: str, items: list[str]) -> str:
        directory = sdir.parent / f"cache-{name}"
        directory.mkdir()
        drawn_items = synthetic.listing(len(items), seed=5)
        np.save(directory / "images.npy", np.stack([synthetic.render(it, 5, size) for it in drawn_items]))
        pd.DataFrame({"item": items, "sha1": [f"{name}{i:038x}" for i in range(len(items))], "width": size,
                      "height": size}).to_csv(directory / "index.csv", index=False)
        return str(directory)

    split = pd.read_csv(sdir / "split.csv")
    dr = json.loads((sdir / "data_report.json").read_text())
    (sdir / "data_report.json").write_text(json.dumps(dr | {"cache": cache("study", list(split["item"]))}))
    # an external set of 40 images with a metadata column, scored by hand-made probabilities
    rng = np.random.default_rng(2)
    index = pd.DataFrame({"item": [f"ext/{i:03d}.png" for i in range(40)], "label": np.arange(40) % 2,
                          "patient": [f"E{i // 2}" for i in range(40)], "view": ["PA", "AP"] * 20,
                          "same_bytes": False, "shared_patient": False})
    runs, _ = evaluation.load_study_runs(spec, str(sdir))
    probs = {k: np.clip(0.5 + 0.35 * (2 * index["label"].to_numpy() - 1) + rng.normal(0, 0.3, 40), 0.001, 0.999)
             for k in runs}
    evaluation.evaluate_external(spec, str(sdir), EXTERNAL, index, probs, {"images": 40})
    index.to_csv(sdir / "external" / EXTERNAL / "index.csv", index=False)
    audit = json.loads((sdir / "external" / EXTERNAL / "audit.json").read_text())
    audit["cache"] = cache(EXTERNAL, list(index["item"]))
    (sdir / "external" / EXTERNAL / "audit.json").write_text(json.dumps(audit))
    report.write(str(sdir))
    return sdir


def test_grids_show_the_served_runs_most_confident_errors(drawn):
    best = json.loads((drawn / "best.json").read_text())
    for name, preds in (("test", drawn / "predictions.csv"),
                        (EXTERNAL, drawn / "external" / EXTERNAL / "predictions.csv")):
        table = pd.read_csv(drawn / "report" / f"failures_{name}.csv")
        expected = failures.most_confident_errors(pd.read_csv(preds), best["arm"], best["seed"])
        assert list(table["item"]) == list(expected["item"]) and len(table) > 0
        wrong = (table["probability"] >= table["threshold"]) != (table["label"] == "PNEUMONIA")
        assert wrong.all()  # every case shown is an error of the served run at its threshold
        png = (drawn / "report" / f"failures_{name}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(png)) as im:
            assert im.width > 400 and im.height > 300
    assert set(pd.read_csv(drawn / "report" / f"failures_{EXTERNAL}.csv")["view"]) <= {"PA", "AP"}  # metadata carried
    md = (drawn / "report" / "report.md").read_text()
    assert "![failures_test](failures_test.png)" in md and f"![failures_{EXTERNAL}](failures_{EXTERNAL}.png)" in md
    card = json.loads((drawn / "report" / "model_card.json").read_text())
    assert set(card["metrics"]["external"]) == {EXTERNAL}


LIGHT_REPORT = """
import sys
from cxr_ray import cli
cli.main(["report", sys.argv[1]])
print("TORCH", "torch" in sys.modules)
"""


def test_a_later_report_keeps_the_grids_without_torch(drawn, tmp_path):
    sdir = shutil.copytree(drawn, tmp_path / "again")
    before = {n: (drawn / "report" / f"failures_{n}.png").read_bytes() for n in ("test", EXTERNAL)}
    out = subprocess.run([sys.executable, "-c", LIGHT_REPORT, str(sdir)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "TORCH False"
    for name, png in before.items():
        assert (sdir / "report" / f"failures_{name}.png").read_bytes() == png


def test_grids_are_redrawn_when_the_cases_change_and_a_missing_cache_is_named(drawn, tmp_path):
    sdir = shutil.copytree(drawn, tmp_path / "changed")
    table = pd.read_csv(sdir / "report" / "failures_test.csv")
    table.loc[0, "probability"] += 0.01  # the last report showed other cases: its grid is stale
    table.to_csv(sdir / "report" / "failures_test.csv", index=False)
    dr = json.loads((sdir / "data_report.json").read_text())
    (sdir / "data_report.json").write_text(json.dumps(dr | {"cache": str(tmp_path / "gone")}))
    html = Path(report.write(str(sdir))).read_text()
    assert not (sdir / "report" / "failures_test.png").exists()
    assert "its decoded images are not on this machine" in html and str(tmp_path / "gone") in html
    assert (sdir / "report" / f"failures_{EXTERNAL}.png").exists()


def test_report_with_failure_cases_and_model_card_renders_in_headless_chromium(drawn):
    with headless_tab(viewport={"width": 1280, "height": 3000}) as tab:
        tab.goto((drawn / "report" / "index.html").as_uri(), wait_until="load")
        headings = tab.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        grids = tab.evaluate("Array.from(document.images).filter(i => i.alt.startsWith('failures_'))"
                             ".map(i => [i.alt, i.complete ? i.naturalWidth : 0])")
        card = tab.evaluate("(() => { const h = Array.from(document.querySelectorAll('h2'))"
                            ".find(h => h.textContent === 'Model card'); let t = '', n = h.nextElementSibling;"
                            " while (n && n.tagName !== 'H2') { t += n.textContent + ' '; n = n.nextElementSibling; }"
                            " return t; })()")
    assert headings.index("Failure cases") < headings.index("Model card") < headings.index("Reproduction")
    assert sorted(a for a, _ in grids) == sorted(["failures_test", f"failures_{EXTERNAL}"])
    assert all(w > 400 for _, w in grids), grids
    assert "Not a medical device" in card and re.search(r"Known limit: SYNTHETIC", card)


def test_the_server_finds_the_card_only_for_the_model_it_describes(drawn):
    sdir = str(drawn)
    card = json.loads((drawn / "report" / "model_card.json").read_text())
    found = model_card.for_model(sdir, {"checkpoint": card["model"]["checkpoint"], "arm": card["model"]["arm"],
                                        "seed": card["model"]["seed"]})
    assert found.json == card and found.markdown == (drawn / "report" / "model_card.md").read_text()
    other = model_card.for_model(sdir, {"checkpoint": "runs/x/checkpoint_000004,runs/y/checkpoint_000004",
                                        "arm": card["model"]["arm"], "seed": -1})
    assert other.json is None and "seed ensemble" in other.missing and card["model"]["arm"] in other.missing
    assert "no model card yet" in model_card.for_model(str(storage.normalize(str(drawn.parent))), {}).missing
