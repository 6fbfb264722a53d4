"""External validation end to end on synthetic data with a deliberate shift (another site's
exposure and noise): a study that names an external set scores it once after the final phase;
`cxr-ray evaluate` scores more sets post hoc without touching anything the study chose; a site
profile from `cxr-ray calibrate` and the seed ensemble are served over real HTTP."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from conftest import CLI, encode
from cxr_ray import data, evaluation, metrics, models, serve_model, serving, synthetic

pytestmark = pytest.mark.e2e
SIZE = 32
SPEC = """
name: shifted
seed: 0
data: {source: synthetic, image_size: 32, synthetic_images: 300}
arms: [lcnet_050, mobilenetv3_small_050]
search_space:
  lr: {loguniform: [2e-3, 1e-2]}
fixed: {batch_size: 32}
budget: {samples_per_arm: 2, max_epochs: 3, grace_period: 3}
resources: {workers_per_trial: 1, cpus_per_worker: 1, max_concurrent_trials: 2}
final: {seeds: [0, 1], bootstrap: 200}
external:
  - {name: othersite, source: synthetic, synthetic_images: 200, synthetic_seed: 5, synthetic_shift: 1.0}
"""
# the files a study's choices live in: nothing scored afterwards may change them
CHOSEN = ["best.json", "best_configs.json", "summary.csv", "comparison.csv", "final.csv", "predictions.csv",
          "validation_predictions.csv", "ensembles.csv", "operating_points.csv", "trials.csv", "final_trials.csv"]


def digests(study: Path) -> dict[str, str]:
    files = [study / n for n in CHOSEN] + sorted(study.glob("runs/*/checkpoint_*/*"))
    return {str(f.relative_to(study)): hashlib.sha1(f.read_bytes()).hexdigest() for f in files}


def write_folder(root: Path, items, pixels, labels) -> Path:
    for it, px, label in zip(items, pixels, labels):
        folder = root / data.CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / it.name).write_bytes(encode(px, "PNG"))  # lossless: the same pixels as the generator's
    return root


def platt(row) -> tuple[float, float] | None:
    """A final.csv row's Platt parameters (None: an uncalibrated operating point)."""
    return None if pd.isna(row.platt_a) else (row.platt_a, row.platt_b)


def synthetic_images(root: Path, n: int) -> np.ndarray:
    source = data.list_source("synthetic", synthetic=synthetic.SyntheticSet(images=n, seed=5, shift=1.0))
    return data.build_cache(source, SIZE, root, progress=False).images


@pytest.fixture(scope="module")
def study(tmp_path_factory, study_env) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("external")
    (root / "shifted.yaml").write_text(SPEC)
    run = subprocess.run(CLI + ["study", "run", str(root / "shifted.yaml"), "--out", str(root / "shifted")],
                         env=study_env, capture_output=True, text=True, timeout=900, start_new_session=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return root / "shifted", run.stdout


def test_the_study_scores_its_external_set_once_with_cis_and_a_verdict(study):
    sdir, console = study
    ext = sdir / "external" / "othersite"
    summary = pd.read_csv(ext / "summary.csv")
    assert set(summary["arm"]) == {"lcnet_050", "mobilenetv3_small_050"} and (summary["seeds"] == 2).all()
    for m in metrics.REPORTED:
        assert (summary[f"{m}_ci_low"] <= summary[m]).all() and (summary[m] <= summary[f"{m}_ci_high"]).all()
    predictions = pd.read_csv(ext / "predictions.csv")
    assert len(predictions) == 4 * 200 and predictions.groupby(["arm", "seed"]).size().eq(200).all()
    chosen = json.loads((sdir / "best.json").read_text())["arm"]
    comparison = pd.read_csv(ext / "comparison.csv")
    assert comparison["versus"].tolist() == [chosen]  # paired against the arm the study chose
    audit = json.loads((ext / "audit.json").read_text())
    assert audit["same_bytes"]["images"] == 0 and audit["shared_patient_ids"]["images"] == 0
    assert audit["scored_images"] == 200 and "left out" in audit["policy"]
    assert json.loads((sdir / "data_report.json").read_text())["external"]["othersite"]["images"] == 200
    # the external ensemble and what each threshold policy costs there
    assert set(pd.read_csv(ext / "ensembles.csv")["arm"]) == set(summary["arm"])
    policies = pd.read_csv(ext / "operating_points.csv")
    assert set(policies["policy"]) >= {"youden", "sensitivity", "specificity"}
    # the verdict names both the internal and the external result
    verdict = json.loads((ext / "verdict.json").read_text())["verdict"]
    assert verdict.startswith("On othersite (external") and chosen in verdict
    assert ("internal verdict is confirmed on othersite" in verdict) != ("is not confirmed on othersite" in verdict)
    assert verdict in console
    report = (sdir / "report" / "index.html").read_text()
    section = report.split("<h2>Internal vs external</h2>", 1)[1].split("<h2>", 1)[0]
    assert "othersite AUROC" in section and "AUROC gap" in section
    assert "external_othersite_roc" in section and "external_othersite_calibration" in section
    for png in ("external_othersite_roc.png", "external_othersite_calibration.png"):
        assert (sdir / "report" / png).read_bytes().startswith(b"\x89PNG")


def test_final_runs_score_the_external_set_with_the_model_they_checkpoint(study, tmp_path):
    """Each final run scores the study's external set at its last epoch (saved beside its
    checkpoint, used by external/othersite/): the probabilities its checkpoint gives when scored
    afresh. Scoring afresh builds one model per backbone (and worker) and swaps each seed's weights
    in: the same probabilities as a model built per checkpoint."""
    import torch
    sdir, _ = study
    final = pd.read_csv(sdir / "final.csv")
    images = synthetic_images(tmp_path, 200)
    fresh = models.predict_checkpoints({(r.arm, r.seed): sdir / r.checkpoint for r in final.itertuples()}, images)
    predictions = pd.read_csv(sdir / "external" / "othersite" / "predictions.csv")
    for r in final.itertuples():
        saved = np.load(sdir / r.checkpoint / "external_othersite_probabilities.npy")
        np.testing.assert_allclose(saved, fresh[(r.arm, r.seed)], atol=1e-6)
        mine = predictions[(predictions["arm"] == r.arm) & (predictions["seed"] == r.seed)]
        np.testing.assert_allclose(mine["probability"], metrics.apply_platt(saved, platt(r)), atol=1e-6)
        model, meta = models.load_checkpoint(sdir / r.checkpoint)
        alone = models.predict(model, images, np.arange(len(images)), (meta["mean"], meta["std"]), torch.device("cpu"))
        np.testing.assert_allclose(fresh[(r.arm, r.seed)], alone, rtol=0, atol=1e-7)


def test_post_hoc_sets_change_nothing_the_study_chose(study, study_env, tmp_path):
    """`cxr-ray evaluate`: the same images again give the study's own external figures; the same
    images with their labels permuted give other figures and leave every chosen thing unchanged."""
    sdir, _ = study
    items = synthetic.listing(200, 5)
    pixels = [synthetic.render(it, 5, SIZE, 1.0) for it in items]
    labels = np.array([it.label for it in items])
    same = write_folder(tmp_path / "same", items, pixels, labels)
    shuffled = np.random.default_rng(0).permutation(labels)
    # plus an image whose patient id names one of the study's own patients: scored both ways
    known = next(it for it in synthetic.listing(300, 0) if it.label == 1)
    extra = synthetic.SyntheticItem(f"{known.patient}-77.png", known.patient, 1, known.patient_index, 77)
    permuted = write_folder(tmp_path / "permuted", items + [extra],
                            pixels + [synthetic.render(extra, 0, SIZE)], np.r_[shuffled, 1])
    before = digests(sdir)
    for name, folder in (("again", same), ("permuted", permuted)):
        out = subprocess.run(CLI + ["evaluate", str(sdir), "--external", f"{name}={folder}"], env=study_env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"On {name} (external" in out.stdout
    assert digests(sdir) == before  # no internal result, threshold or checkpoint moved
    ext = sdir / "external"
    original, again = (pd.read_csv(ext / n / "summary.csv").set_index("arm") for n in ("othersite", "again"))
    pd.testing.assert_frame_equal(again, original, check_exact=False, atol=1e-9)
    # The permuted set is scored with its own labels, whatever the tiny models learned: the same images
    # get the same probabilities as before, the labels are the permuted ones, and every run's AUROC is
    # the one those labels give (a statistic that ignored the given labels would fail here).
    def by_file(name):
        pred = pd.read_csv(ext / name / "predictions.csv")
        return pred.assign(file=pred["item"].str.split("/").str[-1]).set_index(["arm", "seed", "file"]).sort_index()
    scored, seen = by_file("permuted"), by_file("again")
    common = scored.index.intersection(seen.index)
    assert len(common) == len(seen) and len(scored) == len(seen) + 4  # + the extra image, once per run
    np.testing.assert_allclose(scored.loc[common, "probability"], seen.loc[common, "probability"], atol=1e-6)
    given = dict(zip([it.name for it in items] + [extra.name], np.r_[shuffled, 1]))
    assert (scored["label"].to_numpy() == [given[f] for f in scored.index.get_level_values("file")]).all()
    assert (scored.loc[common, "label"] != seen.loc[common, "label"]).sum() > 0
    runs = pd.read_csv(ext / "permuted" / "final.csv").set_index(["arm", "seed"])
    for (arm, seed), g in scored.groupby(level=["arm", "seed"]):
        assert runs.loc[(arm, seed), "auroc"] == pytest.approx(metrics.auroc(g["label"], g["probability"]))
    audit = json.loads((ext / "permuted" / "audit.json").read_text())
    assert audit["shared_patient_ids"]["images"] == 1 and audit["shared_patient_ids"]["examples"] == [
        f"PNEUMONIA/{extra.name}"]
    assert (ext / "permuted" / "summary_without_shared_patient_ids.csv").exists()
    again_run = subprocess.run(CLI + ["evaluate", str(sdir), "--external", f"again={same}"], env=study_env,
                               capture_output=True, text=True, timeout=300)
    assert again_run.returncode == 2 and "already evaluated" in again_run.stderr


LIGHT_CLI = """
import sys
from cxr_ray import cli
cli.main(sys.argv[1:])
print("HEAVY", ",".join(sorted(m for m in ("torch", "timm", "ray.train", "ray.tune") if m in sys.modules)))
"""


def test_on_a_cluster_evaluate_scores_in_a_ray_task_and_imports_no_torch(study, study_env, local_ray, tmp_path):
    """`cxr-ray evaluate` with RAY_ADDRESS set (a cluster: here the local instance this test joined)
    ships the images to one Ray task with a trial worker's resources; the command never imports
    torch, and the probabilities are those of scoring here. (Before the served fixture: its
    replicas hold both CPUs of the local instance.)"""
    import ray
    from ray.util.state import list_tasks
    sdir, _ = study
    env = study_env | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}  # Ray's default
    run = subprocess.run([sys.executable, "-c", LIGHT_CLI, "evaluate", str(sdir), "--external", "cluster=synthetic",
                          "--source", "synthetic", "--synthetic-images", "40", "--synthetic-seed", "5",
                          "--synthetic-shift", "1.0"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    heavy = next(ln for ln in reversed(run.stdout.splitlines()) if ln.startswith("HEAVY"))
    assert heavy.removeprefix("HEAVY").strip() == "", heavy
    tasks = list_tasks(filters=[("func_or_class_name", "=", "_score_here")], raise_on_missing_output=False)
    assert [t.state for t in tasks] == ["FINISHED"]
    final = pd.read_csv(sdir / "final.csv")
    here = models.predict_checkpoints({(r.arm, r.seed): sdir / r.checkpoint for r in final.itertuples()},
                                      synthetic_images(tmp_path, 40))
    predictions = pd.read_csv(sdir / "external" / "cluster" / "predictions.csv")
    for r in final.itertuples():
        mine = predictions[(predictions["arm"] == r.arm) & (predictions["seed"] == r.seed)]
        np.testing.assert_allclose(mine["probability"], metrics.apply_platt(here[(r.arm, r.seed)], platt(r)), atol=1e-6)


def test_serve_time_policy_is_chosen_on_validation(study):
    sdir, _ = study
    best = json.loads((sdir / "best.json").read_text())
    points = pd.read_csv(sdir / "operating_points.csv")
    row = points[(points["arm"] == best["arm"]) & (points["seed"] == best["seed"])
                 & (points["policy"] == "sensitivity")].iloc[0]
    choice = serve_model.choose_model(str(sdir), policy="sensitivity:0.95")
    assert choice.threshold == pytest.approx(row["raw_threshold"], abs=1e-6)  # float32 scores through CSV
    assert choice.operating_point["policy"] == "sensitivity" and choice.operating_point["target"] == 0.95
    with pytest.raises(serve_model.ServingError, match="threshold policy"):
        serve_model.choose_model(str(sdir), policy="sensitivity")


@pytest.fixture(scope="module")
def served(study, study_env, local_ray):
    """The study served twice over HTTP: its seed ensemble, and its model at a site's own threshold."""
    from ray import serve

    from cxr_ray import runtime
    sdir, _ = study
    calibrate = subprocess.run(CLI + ["calibrate", str(sdir), "--name", "siteA", "--source", "synthetic",
                                      "--synthetic-seed", "7", "--synthetic-shift", "1.0", "--synthetic-images", "150",
                                      "--policy", "specificity", "--target", "0.9", "--prevalence", "0.4"],
                               env=study_env, capture_output=True, text=True, timeout=300)
    assert calibrate.returncode == 0, calibrate.stderr[-3000:]
    assert "must not" in calibrate.stdout or "other images than this sample" in calibrate.stdout
    assert "operating point  site siteA: specificity 0.9 threshold" in calibrate.stdout
    assert "at prevalence 0.40 (site) PPV" in calibrate.stdout
    port = runtime.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(serving.build(str(sdir), ensemble=True), name="ensemble", route_prefix="/ensemble")
    serve.run(serving.build(str(sdir), site="siteA"), name="site", route_prefix="/site")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def offline(sdir: Path, checkpoints: list[str], png: bytes) -> float:
    """The ensemble's probability as the offline evaluation computes it: cache pixels, each checkpoint, mean."""
    pixels = data.imaging.to_pixels(png, SIZE, "x").pixels
    probs = []
    for c in checkpoints:
        model, meta = models.load_checkpoint(sdir / c)
        probs.append(models.predict(model, pixels[None], np.array([0]), (meta["mean"], meta["std"]),
                                    __import__("torch").device("cpu"))[0])
    return float(np.mean(probs))


def test_served_ensemble_equals_offline_scoring(study, served):
    sdir, _ = study
    best = json.loads((sdir / "best.json").read_text())
    info = requests.get(f"{served}/ensemble/v1/model", timeout=30).json()
    assert info["model"]["members"] == 2 and info["model"]["seed"] == -1
    assert info["threshold"] == pytest.approx(best["ensemble"]["threshold"])
    assert "othersite" in info["external_metrics"] and info["test_metrics"]["auroc"] > 0
    for it in synthetic.listing(6, 9):
        png = encode(synthetic.render(it, 9, SIZE), "PNG")
        r = requests.post(f"{served}/ensemble/v1/predict", data=png, headers={"content-type": "image/png"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["probability"] == pytest.approx(offline(sdir, best["ensemble"]["checkpoints"], png), abs=1e-5)


def test_site_profile_round_trip(study, served):
    sdir, _ = study
    profile = json.loads((sdir / "sites" / "siteA.json").read_text())
    assert profile["images"] == 150 and profile["policy"] == "specificity"
    assert profile["model"]["on_sample"]["specificity"] >= 0.9  # what the policy promised on its own sample
    info = requests.get(f"{served}/site/v1/model", timeout=30).json()
    assert info["threshold"] == pytest.approx(profile["model"]["threshold"])
    assert info["operating_point"]["site"] == "siteA" and "150 images" in info["operating_point"]["chosen_on"]
    assert profile["prevalence"] == info["operating_point"]["prevalence"] == 0.4  # specificity: the point stays
    point = profile["model"]["point"]
    assert point["threshold"] == pytest.approx(profile["model"]["threshold"]) and point["site_prevalence"] == 0.4
    default = serve_model.choose_model(str(sdir))
    assert info["threshold"] != pytest.approx(default.threshold)  # the site moved it
    labels = []
    for it in synthetic.listing(12, 11):
        png = encode(synthetic.render(it, 11, SIZE, 1.0), "PNG")
        answer = requests.post(f"{served}/site/v1/predict", data=png, headers={"content-type": "image/png"},
                               timeout=60).json()
        labels.append(answer["label"] == ("PNEUMONIA" if answer["probability"] >= info["threshold"] else "NORMAL"))
    assert all(labels)
    with pytest.raises(FileNotFoundError, match="no site profile 'siteB'"):
        serve_model.choose_model(str(sdir), site="siteB")


def test_overlap_audit_finds_bytes_and_patient_ids(kaggle_tree, make_kaggle_tree, tmp_path):
    """A second Kaggle-style set holding a byte copy of a study image and a file named for a study
    patient: the audit flags exactly those, by kind and by the study split they repeat."""
    study_source = data.list_source("kaggle", str(kaggle_tree.root))
    cache = data.build_cache(study_source, SIZE, tmp_path / "cache", progress=False)
    split = data.make_split(cache.index, seed=0)
    other = make_kaggle_tree(name="other", seed=11, n_images=12)
    train_item = split[split["split"] == "train"].iloc[0]
    copy = other.layout / "test" / data.CLASSES[int(train_item["label"])] / "copied.png"
    copy.write_bytes(kaggle_tree.path(train_item["item"]).read_bytes())
    patient = next(p for p in split.loc[split["split"] == "val", "patient"] if str(p).startswith("SYN-S3-"))
    named = other.layout / "test" / "NORMAL" / f"{patient}-55.png"
    named.write_bytes(encode(synthetic.render(synthetic.listing(3, 4)[0], 4, 48), "PNG"))
    ext_cache = data.build_cache(data.list_source("kaggle", str(other.root)), SIZE, tmp_path / "cache",
                                 progress=False)
    flagged, summary = data.audit_overlap(ext_cache.index, split)
    assert flagged.loc[flagged["same_bytes"], "item"].tolist() == [str(copy.relative_to(other.layout))]
    shared = set(flagged.loc[flagged["shared_patient"], "item"])
    assert str(named.relative_to(other.layout)) in shared
    assert summary["same_bytes"]["in_splits"]["train"] == 1 and summary["shared_patient_ids"]["in_splits"]["val"] >= 1
    # the other tree's own SYN-S11 patients never collide with the study's SYN-S3 ones
    assert not flagged.loc[flagged["item"].str.contains("SYN-S11"), "shared_patient"].any()


def test_verdict_sentences_on_hand_made_tables():
    internal = pd.DataFrame([{"arm": "A", "auroc": 0.98}, {"arm": "B", "auroc": 0.95}])
    internal_cmp = pd.DataFrame([{"arm": "B", "significant": True}])
    row = {"auroc": 0.90, "auroc_ci_low": 0.85, "auroc_ci_high": 0.94, "accuracy": 0.80, "accuracy_ci_low": 0.75,
           "accuracy_ci_high": 0.85, "sensitivity": 0.97, "specificity": 0.55}
    external = pd.DataFrame([{"arm": "B", **row, "auroc": 0.92}, {"arm": "A", **row}])
    same = pd.DataFrame([{"arm": "B", "delta_auroc": 0.02, "delta_ci_low": -0.01, "delta_ci_high": 0.05,
                          "p_holm": 0.3, "significant": False}])
    text = evaluation.external_verdict("site", internal, internal_cmp, external, same, "A", 1000)
    assert "A reaches AUROC 0.900 (0.850-0.940)" in text and "an AUROC 0.080 lower than on the internal" in text
    assert "The internal ranking does not hold there (A > B internally, B > A on site)." in text
    assert "The internal verdict is not confirmed on site: against A there, B (AUROC 0.020 higher" in text
    confirmed = evaluation.external_verdict("site", internal, internal_cmp, external.iloc[::-1],
                                            same.assign(delta_auroc=-0.1, significant=True), "A", 1000)
    assert "The internal ranking holds there." in confirmed and "internal verdict is confirmed on site" in confirmed
