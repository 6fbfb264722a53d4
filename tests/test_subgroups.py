"""Subgroup results: hand-computed metrics, the patient bootstrap they share with the set, "too few",
Holm over subgroups, age bands, missing columns, and the report's Subgroups section in Chromium."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO_ROOT, chromium, fake_spec_raw, write_fake_study
from cxr_ray import evaluation, metrics, report, spec as specs, subgroups
from cxr_ray.evaluation import Run

BANDS = [0, 18, 40, 65, 120]


def make_spec(**keys) -> specs.Spec:
    return specs.validate(fake_spec_raw() | {"subgroups": ["sex"], "subgroup_min": 4} | keys, "test.yaml")


def run(arm: str, seed: int, threshold: float) -> Run:
    return Run(arm, seed, [f"{arm}-{seed}"], 0.8, np.zeros(0), np.zeros(0), threshold, None)


# A hand-made set of nine images, one per patient. Sex F: images 0-3 (labels 1 1 1 0); M: images 4-7
# (0 0 1 0); image 8 has no sex recorded: a subgroup of one image, too few.
LABELS = np.array([1, 1, 1, 0, 0, 0, 1, 0, 1])
SEX = ["F", "F", "F", "F", "M", "M", "M", "M", None]
PROBS = {("resnet18", 0): np.array([0.9, 0.6, 0.3, 0.5, 0.2, 0.4, 0.7, 0.1, 0.5]),
         ("resnet18", 1): np.array([0.8, 0.2, 0.7, 0.1, 0.3, 0.6, 0.4, 0.2, 0.5]),
         ("densenet", 0): np.array([0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.9, 0.1, 0.5])}
THRESHOLDS = {("resnet18", 0): 0.55, ("resnet18", 1): 0.5, ("densenet", 0): 0.5}


@pytest.fixture(scope="module")
def hand_made():
    spec = make_spec(final={"seeds": [0, 1], "bootstrap": 300})
    index = pd.DataFrame({"label": LABELS, "patient": [f"P{i}" for i in range(9)], "sex": SEX})
    runs = {k: run(*k, t) for k, t in THRESHOLDS.items()}
    comparison = pd.DataFrame({"arm": ["resnet18"], "versus": ["densenet"], "verdict": ["worse than densenet"]})
    table, compared = subgroups.score(spec, "test", index, runs, PROBS, comparison)
    return spec, index, table, compared


def row(table: pd.DataFrame, level: str, arm: str) -> pd.Series:
    return table[(table["level"] == level) & (table["arm"] == arm)].iloc[0]


def test_subgroup_metrics_match_hand_computed_values(hand_made):
    _, _, table, _ = hand_made
    f = row(table, "F", "resnet18")
    # seed 0 on F: positives 0.9, 0.6, 0.3 against the negative 0.5 -> AUROC 2/3; at 0.55 two of three
    # positives called, the negative not. Seed 1: 0.8, 0.2, 0.7 against 0.1 -> AUROC 1; at 0.5 two of three.
    assert f["auroc"] == pytest.approx((2 / 3 + 1) / 2)
    assert f["sensitivity"] == pytest.approx(2 / 3) and f["specificity"] == pytest.approx(1.0)
    assert (f["n_images"], f["n_patients"], f["positives"], f["seeds"], f["status"]) == (4, 4, 3, 2, "scored")
    m = row(table, "M", "resnet18")
    # seed 0 on M: the positive 0.7 against 0.2, 0.4, 0.1 -> 1; seed 1: 0.4 against 0.3, 0.6, 0.2 -> 2/3
    assert m["auroc"] == pytest.approx((1 + 2 / 3) / 2)
    # seed 0 at 0.55: 0.7 called, no negative; seed 1 at 0.5: 0.4 missed, the negative 0.6 called
    assert m["sensitivity"] == pytest.approx(0.5) and m["specificity"] == pytest.approx((1 + 2 / 3) / 2)
    whole = row(table, "all", "resnet18")
    assert whole["n_images"] == 9 and whole["auroc"] == pytest.approx(np.mean(
        [metrics.auroc(LABELS, p) for k, p in PROBS.items() if k[0] == "resnet18"]))


def test_subgroup_cis_resample_the_sets_own_patients(hand_made):
    """A subgroup's CI is the set's patient bootstrap (the same draws as summary.csv) restricted to its
    images: recomputed here resample by resample, with the scalar AUROC."""
    spec, index, table, _ = hand_made
    counts = metrics.resample_counts(index["patient"].to_numpy(), spec.final.bootstrap, spec.seed)
    female = np.flatnonzero(index["sex"].to_numpy() == "F")
    values = []
    for draws in counts[:, female].astype(int):
        picked = np.repeat(female, draws)
        if len(set(LABELS[picked])) == 2:
            values.append(np.mean([metrics.auroc(LABELS[picked], PROBS[("resnet18", s)][picked]) for s in (0, 1)]))
    f = row(table, "F", "resnet18")
    assert (f["auroc_lo"], f["auroc_hi"]) == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])))


def test_a_small_or_single_class_subgroup_is_too_few(hand_made):
    spec, index, table, compared = hand_made
    missing = table[table["level"] == subgroups.MISSING]
    assert set(missing["status"]) == {"too few"} and missing[["auroc", "auroc_lo", "sensitivity"]].isna().all().all()
    assert set(compared.loc[compared["level"] == subgroups.MISSING, "status"]) == {"too few"}
    runs = {k: run(*k, t) for k, t in THRESHOLDS.items()}
    higher = subgroups.score(make_spec(subgroup_min=5), "test", index, runs, PROBS, None)[0]
    assert set(higher.loc[higher["column"] == "sex", "status"]) == {"too few"}  # 4 images < 5
    single = index.assign(sex=["F"] * 3 + ["M"] * 6)  # F: three positives only
    table = subgroups.score(make_spec(subgroup_min=2), "test", single, runs, PROBS, None)[0]
    assert set(table.loc[table["level"] == "F", "status"]) == {"too few"}
    assert set(table.loc[table["level"] == "M", "status"]) == {"scored"}


def test_subgroup_verdicts_are_holm_adjusted_over_subgroups():
    compared = pd.DataFrame({"arm": ["a", "a", "a", "b"], "versus": "x", "status": "scored",
                             "delta_auroc": [-0.2, -0.1, 0.1, -0.3], "p": [0.01, 0.04, 0.03, 0.01],
                             "overall_verdict": "worse than x"}, columns=subgroups.COMPARISON_COLUMNS)
    out = subgroups.holm_verdicts(compared)
    # arm a: 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; 1 x 0.04, kept monotone: 0.06. Arm b is its own family.
    assert list(out["p_holm"]) == pytest.approx([0.03, 0.06, 0.06, 0.01])
    assert list(out["verdict"]) == ["worse than x", "no significant difference", "no significant difference",
                                    "worse than x"]
    assert list(out["holds"]) == [True, False, False, True]


def test_comparison_uses_the_sets_paired_test(hand_made):
    spec, index, _, compared = hand_made
    f = compared[compared["level"] == "F"].iloc[0]
    assert (f["arm"], f["versus"], f["overall_verdict"]) == ("resnet18", "densenet", "worse than densenet")
    assert f["delta_auroc"] == pytest.approx((2 / 3 + 1) / 2 - 1.0)  # densenet separates F perfectly
    scored = compared[compared["status"] == "scored"]
    assert list(scored["p_holm"]) == pytest.approx(evaluation.holm(scored["p"].tolist()))


def test_age_bands():
    ages = [0, 17.9, 18, 39, 40, 64, 65, 120, 121, -1, None, "unknown"]
    assert list(subgroups.age_band(ages, BANDS)) == [
        "[0, 18)", "[0, 18)", "[18, 40)", "[18, 40)", "[40, 65)", "[40, 65)", "[65, 120]", "[65, 120]",
        "outside [0, 120]", "outside [0, 120]", "missing", "missing"]
    values, order = subgroups.levels(pd.DataFrame({"age": [70, 30, None]}), "age_band", BANDS)
    assert order == ["[0, 18)", "[18, 40)", "[40, 65)", "[65, 120]", "missing"]  # every band, in age order
    assert list(values) == ["[65, 120]", "[18, 40)", "missing"]
    assert subgroups.levels(pd.DataFrame({"sex": ["F"]}), "age_band", BANDS) is None


def test_a_column_no_set_records_is_an_error_before_training():
    with pytest.raises(subgroups.SubgroupError, match=r"'ethnicity'.*test, ext\) record: age, sex, site"):
        subgroups.check_columns(["sex", "ethnicity"], {"test": ["item", "label", "sex", "age"], "ext": ["site"]})
    with pytest.raises(subgroups.SubgroupError, match="'age_band' \\(needs 'age'\\)"):
        subgroups.check_columns(["age_band"], {"test": ["sex"]})
    lacking = subgroups.check_columns(["sex", "age_band", "site"], {"test": ["sex", "age"], "ext": ["site", "sex"]})
    assert lacking == {"test": ["site"], "ext": ["age_band"]}  # absent from one set only: said in the report


@pytest.mark.parametrize("keys, message", [
    ({"subgroups": "sex"}, "subgroups must be a list"), ({"subgroups": ["sex", "sex"]}, "duplicates"),
    ({"subgroups": ["label"]}, "'label' is not a metadata column"),
    ({"age_bands": [0, 40, 18]}, "age_bands must be at least two increasing"),
    ({"subgroup_min": 1}, "subgroup_min must be an integer >= 2")])
def test_bad_subgroup_keys_name_the_key(keys, message):
    with pytest.raises(specs.SpecError, match=message):
        specs.validate(fake_spec_raw() | keys, "test.yaml")


def test_subgroup_and_manifest_keys_leave_other_studies_hashes_alone():
    """Keys added since studies were first hashed count only when set: the shipped Kaggle study keeps
    the hash its published results (README) name, while its spec.yaml still spells out every key."""
    assert specs.load(str(REPO_ROOT / "studies" / "kaggle_cpu.yaml")).hash == "e9ec24747f7b"
    plain = specs.validate(fake_spec_raw(), "a.yaml")
    assert plain.raw["subgroups"] == [] and "subgroups: []" in specs.dump(plain)
    assert specs.validate_text(specs.dump(plain), "spec.yaml").hash == plain.hash
    with_subgroups = make_spec()
    assert with_subgroups.hash != plain.hash and with_subgroups.raw["subgroups"] == ["sex"]
    assert specs.validate_text(specs.dump(with_subgroups), "spec.yaml").subgroups == ["sex"]


# ----------------------------------------------------------------------------- a study, through the evaluation

@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """The fake finished study with metadata and subgroups, evaluated again by the real evaluation, and
    an external set whose AP images every arm scores at chance (so AP is worse there by construction)."""
    root = write_fake_study(tmp_path_factory.mktemp("subgroups") / "fake")
    spec = specs.validate(fake_spec_raw() | {"subgroups": ["sex", "view", "age_band", "site"], "subgroup_min": 10},
                          str(root / "fake.yaml"))
    (root / "spec.yaml").write_text(specs.dump(spec))
    split = pd.read_csv(root / "split.csv")
    patient = split["patient"].str[-5:].astype(int).to_numpy()
    split = split.assign(sex=np.where(patient % 2, "F", "M"), age=20 + (patient * 7) % 70,
                         view=np.where(np.arange(len(split)) % 2, "AP", "PA"), site="synthetic-0")
    split.to_csv(root / "split.csv", index=False)
    rows = {s: np.flatnonzero(split["split"] == s) for s in ("test", "val")}
    evaluation.evaluate(spec, str(root), SimpleNamespace(rows=rows, cache=SimpleNamespace(index=split)),
                        pd.read_csv(root / "final_trials.csv"))

    n = 240
    rng = np.random.default_rng(7)
    y, ap = np.arange(n) % 2, np.arange(n) >= n // 2
    ext = pd.DataFrame({"item": [f"E{i}.png" for i in range(n)], "label": y, "patient": [f"E{i}" for i in range(n)],
                        "same_bytes": False, "shared_patient": False, "sex": np.where(rng.random(n) < .5, "F", "M"),
                        "view": np.where(ap, "AP", "PA"), "site": "othersite"})  # no age recorded
    runs, _ = evaluation.load_study_runs(spec, str(root))
    probs = {k: np.where(ap, rng.random(n), 1 / (1 + np.exp(-(3 * (2 * y - 1) + rng.normal(0, 1, n)))))
             for k in runs}
    evaluation.evaluate_external(spec, str(root), "othersite", ext, probs, {"images": n})
    return root


def test_evaluation_writes_each_sets_subgroup_files(study):
    table, compared = pd.read_csv(study / "subgroups.csv"), pd.read_csv(study / "subgroup_comparison.csv")
    assert set(subgroups.TABLE_COLUMNS) <= set(table.columns) and set(table["set"]) == {"test"}
    assert {"sex", "view", "age_band", "site", "all"} == set(table["column"])
    test = pd.read_csv(study / "split.csv").query("split == 'test'")
    female = table[(table["level"] == "F") & (table["arm"] == "densenet")].iloc[0]
    assert female["n_images"] == (test["sex"] == "F").sum() and female["n_patients"] == test.loc[
        test["sex"] == "F", "patient"].nunique()
    summary = pd.read_csv(study / "summary.csv").set_index("arm")  # the "all" rows are summary.csv's figures
    whole = table[table["column"] == "all"].set_index("arm")
    for m in subgroups.METRICS:
        assert whole[m].to_numpy() == pytest.approx(summary.loc[whole.index, m].to_numpy())
        assert whole[f"{m}_lo"].to_numpy() == pytest.approx(summary.loc[whole.index, f"{m}_ci_low"].to_numpy())
    assert set(compared["versus"]) == {pd.read_csv(study / "comparison.csv")["versus"].iat[0]}

    ext = pd.read_csv(study / "external" / "othersite" / "subgroups.csv")
    assert set(ext["set"]) == {"othersite"}
    assert set(ext.loc[ext["column"] == "age_band", "status"]) == {"not recorded"}
    assert (study / "external" / "othersite" / "subgroup_comparison.csv").exists()
    said = subgroups.study_sentence(str(study), "densenet")  # the study's last console lines
    assert "othersite: view AP: AUROC" in said


@pytest.fixture(scope="module")
def rendered(study) -> Path:
    return Path(report.write(str(study))).parent


def test_report_names_the_subgroup_below_the_overall_estimate(rendered):
    html = re.sub(r"\s+", " ", (rendered / "index.html").read_text())
    assert re.findall(r"<h2>(.*?)</h2>", html)[:3] == ["Verdict", "Internal vs external", "Subgroups"]
    verdict = html.split("<h2>Verdict</h2>", 1)[1].split("<h2>", 1)[0]
    assert re.search(r"lies wholly below its estimate on the whole set: .*othersite: view AP: AUROC", verdict)
    section = html.split("<h2>Subgroups</h2>", 1)[1].split("<h2>", 1)[0]
    assert "Not recorded for this set: age_band." in section and "view AP: AUROC" in section
    shown = pd.read_csv(rendered / "subgroups_othersite.csv")
    assert set(shown.loc[shown["level"] == "AP", "status"]) == {"scored"}
    assert "could not be shown" not in html and "not shown, because" not in html


def test_report_subgroup_section_renders_in_headless_chromium(rendered):
    browser_path = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 2000})
            tab.goto((rendered / "index.html").as_uri(), wait_until="load")
            forest = tab.evaluate("(() => { const i = document.querySelector(\"img[alt='subgroups_forest']\");"
                                  " return i && i.complete ? [i.naturalWidth, i.naturalHeight] : null })()")
            rows = tab.evaluate("""(() => {  // table rows between the Subgroups heading and the next one
                let n = 0, e = Array.from(document.querySelectorAll('h2')).find(h => h.textContent === 'Subgroups');
                for (e = e.nextElementSibling; e && e.tagName !== 'H2'; e = e.nextElementSibling)
                    n += e.querySelectorAll('tr').length;
                return n })()""")
        finally:
            browser.close()
    assert forest and forest[0] > 400 and forest[1] > 200, forest
    assert rows > 20
    with Image.open(rendered / "subgroups_forest.png") as im:
        assert im.width == forest[0]


TYPO_SPEC = """
name: typo
data: {source: synthetic, image_size: 32, synthetic_images: 40}
arms: [lcnet_050]
search_space: {lr: {choice: [0.001]}}
budget: {samples_per_arm: 1, max_epochs: 1}
external:
  - {name: othersite, source: synthetic, synthetic_images: 20, synthetic_seed: 5}
subgroups: [sex, veiw]
"""


@pytest.mark.e2e  # the study command itself (imports torch and Ray; no Ray started, nothing trained)
def test_a_misspelt_subgroup_column_stops_the_study_before_training(capsys, tmp_path):
    """The study prepares its data, finds that no set records the column, and exits 2 with a one-line
    error before Ray starts or anything trains; the prepared data stays."""
    from cxr_ray import cli
    (tmp_path / "typo.yaml").write_text(TYPO_SPEC)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["study", "run", str(tmp_path / "typo.yaml"), "--out", str(tmp_path / "study")])
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the decoding progress
    assert stopped.value.code == 2 and "no set records a column 'veiw'" in error
    assert "record: age, sex, site, view" in error
    assert (tmp_path / "study" / "split.csv").exists() and not (tmp_path / "study" / "search").exists()
