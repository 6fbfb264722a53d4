"""`cxr-ray compare`: finished studies side by side and their served winners tested on common images.

Unit tests on copies of the fake finished study (conftest.write_fake_study: the study's own writers, no Ray): one at
64 px and one at 96 px whose served model scores otherwise, sharing their test split and an external
set; a third holding no image of the first. The paired test is checked against a direct computation
(a loop over patient resamples) on the same probabilities. The e2e tests (marked e2e) run two real
tiny studies at 24 and 32 px sharing their data and an external site, and render the page in headless
Chromium.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import CLI, headless_tab
from cxr_ray import cli, compare, evaluation, metrics, spec as specs

SECTIONS = ["Verdict", "What differs", "Winners on the same images", "Arm by arm", "Cost", "What tuning bought"]
SITE = "site"


def add_external_set(sdir: Path, name: str, n_patients: int = 40) -> None:
    """An external set of files (identified by SHA-1) scored by every final run, written by the study's own
    writer (evaluation.evaluate_external), with the index.csv an audit writes."""
    spec = specs.validate_text((sdir / "spec.yaml").read_text(), str(sdir / "spec.yaml"))
    index = pd.DataFrame([{"item": f"ext/p{p:03d}-{k}.png", "label": int(p % 2), "patient": f"x{p:03d}",
                           "patient_parsed": True, "sha1": f"{p * 2 + k:040x}"[::-1], "same_bytes": False,
                           "shared_patient": False} for p in range(n_patients) for k in range(2)])
    rng = np.random.default_rng(7)
    runs, _ = evaluation.load_study_runs(spec, str(sdir))
    y = index["label"].to_numpy()
    probs = {key: 1 / (1 + np.exp(-(1.2 * (2 * y - 1) + rng.normal(0, 1, len(y))))) for key in runs}
    (sdir / "external" / name).mkdir(parents=True)
    index.to_csv(sdir / "external" / name / "index.csv", index=False)
    evaluation.evaluate_external(spec, str(sdir), name, index, probs,
                                 {"images": len(index), "set": {"source": "kaggle", "path": "/data/site"}})


def rescore_served(sdir: Path, seed: int) -> None:
    """Another served model: new probabilities for best.json's run on the test split and every external set."""
    best = pd.read_json(sdir / "best.json", typ="series")
    rng = np.random.default_rng(seed)
    for table in [sdir / "predictions.csv", *sdir.glob("external/*/predictions.csv")]:
        p = pd.read_csv(table)
        mine = (p["arm"] == best["arm"]) & (p["seed"] == best["seed"])
        y = p.loc[mine, "label"].to_numpy()
        p.loc[mine, "probability"] = 1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(0, 1, len(y)))))
        p.to_csv(table, index=False)


def set_image_size(sdir: Path, size: int) -> None:
    raw = yaml.safe_load((sdir / "spec.yaml").read_text())
    raw["data"]["image_size"] = size
    (sdir / "spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def studies(fake_study_dir, tmp_path_factory) -> dict[str, Path]:
    """a: the fake study with an external set; b: at 96 px, another served model, the same held-out images;
    apart: a study none of whose images a holds."""
    root = tmp_path_factory.mktemp("compare")
    a = Path(shutil.copytree(fake_study_dir, root / "a", ignore=shutil.ignore_patterns("report")))
    add_external_set(a, SITE)
    b = Path(shutil.copytree(a, root / "b"))
    set_image_size(b, 96)
    rescore_served(b, 3)
    apart = Path(shutil.copytree(a, root / "apart"))
    shutil.rmtree(apart / "external")
    for table in ("split.csv", "predictions.csv"):
        t = pd.read_csv(apart / table)
        t["item"] = "other-" + t["item"]
        t.to_csv(apart / table, index=False)
    return {"a": a, "b": b, "apart": apart}


@pytest.fixture(scope="module")
def page(studies, tmp_path_factory) -> tuple[Path, pd.DataFrame, list[str]]:
    out = tmp_path_factory.mktemp("page") / "a-vs-b"
    index, table, said = compare.write([str(studies["a"]), str(studies["b"])], str(out), measure=False)
    return Path(index), table, said


def served_scores(sdir: Path, predictions: Path, key_of: dict) -> pd.DataFrame:
    best = pd.read_json(sdir / "best.json", typ="series")
    p = pd.read_csv(predictions)
    p = p[(p["arm"] == best["arm"]) & (p["seed"] == best["seed"])]
    return p.assign(key=p["item"].map(key_of))


def direct_paired_test(a: pd.DataFrame, b: pd.DataFrame, n_bootstrap: int, seed: int) -> dict:
    """The paired patient bootstrap written out as a loop: each resample draws patients with replacement
    (the same draws for both models) and recomputes both AUROCs on the repeated images."""
    both = a.merge(b, on="key", suffixes=("_a", "_b"))
    y, pa, pb = both["label_a"].to_numpy(), both["probability_a"].to_numpy(), both["probability_b"].to_numpy()
    patients = sorted(set(both["patient_a"]))
    rows_of = {p: np.flatnonzero(both["patient_a"].to_numpy() == p) for p in patients}
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n_bootstrap):
        rows = np.concatenate([rows_of[patients[i]] for i in rng.integers(0, len(patients), len(patients))])
        if len(set(y[rows])) == 2:
            deltas.append(metrics.auroc(y[rows], pb[rows]) - metrics.auroc(y[rows], pa[rows]))
    deltas = np.array(deltas)
    return {"images": len(y), "delta_auroc": metrics.auroc(y, pb) - metrics.auroc(y, pa),
            "ci": tuple(np.quantile(deltas, [0.025, 0.975])),
            "p_bootstrap": min(1.0, 2 * min((deltas <= 0).mean(), (deltas >= 0).mean())),
            "p_delong": metrics.delong(y, pb, pa)["p_value"]}


def check_against_direct(table: pd.DataFrame, a: Path, b: Path, sets: dict[str, tuple[Path, Path, dict, dict]],
                         n_bootstrap: int, seed: int) -> None:
    """Every row of compare's paired table equals the direct computation; Holm over the rows."""
    direct = {}
    for name, (pred_a, pred_b, keys_a, keys_b) in sets.items():
        direct[name] = direct_paired_test(served_scores(a, pred_a, keys_a), served_scores(b, pred_b, keys_b),
                                          n_bootstrap, seed)
    assert sorted(table["set"]) == sorted(direct)
    for r in table.itertuples():
        d = direct[r.set]
        assert r.images == d["images"]
        assert r.delta_auroc == pytest.approx(d["delta_auroc"], abs=1e-12)
        assert (r.delta_ci_low, r.delta_ci_high) == pytest.approx(d["ci"], abs=1e-12)
        assert r.p_bootstrap == pytest.approx(d["p_bootstrap"], abs=1e-12)
        assert r.p_delong == pytest.approx(d["p_delong"], abs=1e-12)
    raw = [direct[s]["p_bootstrap"] for s in table["set"]]
    assert list(table["p_holm"]) == pytest.approx(evaluation.holm(raw), abs=1e-12)


def synthetic_keys(sdir: Path) -> dict:
    split = pd.read_csv(sdir / "split.csv")
    return dict(zip(split["item"], split["item"]))


def sha1_keys(sdir: Path, name: str) -> dict:
    index = pd.read_csv(sdir / "external" / name / "index.csv", dtype={"sha1": str})
    return dict(zip(index["item"], index["sha1"]))


def item_keys(sdir: Path, name: str) -> dict:
    index = pd.read_csv(sdir / "external" / name / "index.csv")
    return dict(zip(index["item"], index["item"]))


def test_the_page_has_every_section_and_the_verdict(page):
    index, table, said = page
    html, md = index.read_text(), (index.parent / "report.md").read_text()
    assert re.findall(r"<h2>(.*?)</h2>", html) == SECTIONS
    assert re.findall(r"^## (.*)$", md, re.M) == SECTIONS
    assert "could not be shown" not in html and "not shown, because" not in html
    # one sentence per common set, printed by the command and opening the page
    assert len(said) == len(table) == 2 and set(table["set"]) == {"test", SITE}
    verdict = html.split("<h2>Verdict</h2>", 1)[1].split("<h2>", 1)[0]
    for sentence in said:
        assert re.match(r"Study b's winner (is (better|worse) than|cannot be told apart from) a's on (test|site): "
                        r"AUROC \d\.\d{3} vs \d\.\d{3}, difference [+-]\d\.\d{3} \(95% CI ", sentence)
        assert html_escape(sentence) in verdict
    # each study's own verdict, and the held-out sets with their fingerprints: the same images, the same print
    assert verdict.count("The best backbone in this study is densenet") == 2
    held = pd.read_csv(index.parent / "held_out.csv")
    assert len(held) == 4 and held.groupby("set")["fingerprint"].nunique().eq(1).all()
    assert table["same_fingerprint"].all()


def test_the_spec_diff_names_the_image_sizes(page):
    index, _, _ = page
    diff = pd.read_csv(index.parent / "spec_diff.csv")
    assert diff.to_dict("records") == [{"section": "data", "setting": "data.image_size", "a": 64, "b": 96}]
    assert "different image sizes (a 64 px, b 96 px): allowed" in index.read_text()


def test_arms_side_by_side_with_cis_on_test_and_the_external_set(page, studies):
    index, _, _ = page
    for name, summary in (("test", studies["a"] / "summary.csv"),
                          (SITE, studies["a"] / "external" / SITE / "summary.csv")):
        table = pd.read_csv(index.parent / f"arms_{name}.csv")
        expected = pd.read_csv(summary).set_index("arm")
        assert set(table["arm"]) == set(expected.index)
        for r in table.itertuples(index=False):
            row = dict(zip(table.columns, r))
            ci = evaluation.ci_text(expected.loc[row["arm"]], "auroc")
            served = " (served)" if row["arm"] == "densenet" else ""
            assert row[f"a AUROC{served}"] == row[f"b AUROC{served}"] == ci  # b's summaries are a's: copied


def test_the_paired_test_is_the_direct_computation(page, studies):
    _, table, _ = page
    a, b = studies["a"], studies["b"]
    spec = specs.validate_text((a / "spec.yaml").read_text(), "a")
    check_against_direct(table, a, b, {
        "test": (a / "predictions.csv", b / "predictions.csv", synthetic_keys(a), synthetic_keys(b)),
        SITE: (a / "external" / SITE / "predictions.csv", b / "external" / SITE / "predictions.csv",
               sha1_keys(a, SITE), sha1_keys(b, SITE))}, spec.final.bootstrap, spec.seed)
    assert (table["delta_auroc"] != 0).all()  # b serves another model


def test_tuning_spread_per_arm(page, studies):
    index, _, _ = page
    tuning = pd.read_csv(index.parent / "tuning.csv")
    trials = pd.read_csv(studies["a"] / "trials.csv")
    last = trials.sort_values("epoch").groupby("trial_id").last()
    for arm, g in last.groupby("arm"):
        row = tuning[(tuning["study"] == "a") & (tuning["arm"] == arm)].iloc[0]
        assert row["configurations"] == len(g) == 4
        assert (row["best"], row["median"], row["worst"]) == pytest.approx(
            (g["val_auroc"].max(), g["val_auroc"].median(), g["val_auroc"].min()))


def test_no_common_images_is_said_not_tested(studies, tmp_path, capsys):
    cli.main(["compare", str(studies["a"]), str(studies["apart"]), "--out", str(tmp_path / "out"), "--no-speed"])
    printed = capsys.readouterr().out
    assert printed.startswith(compare.no_common_images("apart", "a"))
    html = (tmp_path / "out" / "index.html").read_text()
    assert "No common images" in html and not (tmp_path / "out" / "winners.csv").exists()


def test_images_whose_labels_disagree_are_left_out():
    a = pd.DataFrame({"key": list("abcdef"), "label": [0, 0, 0, 1, 1, 1], "patient": list("pqrstu"),
                      "probability": [0.1, 0.4, 0.35, 0.8, 0.7, 0.2], "threshold": 0.5})
    b = a.assign(label=[0, 0, 0, 1, 1, 0], probability=[0.2, 0.1, 0.3, 0.9, 0.6, 0.4])
    found = compare.paired(a, b, 50, 0)
    assert found["images"] == 5 and found["labels_disagree"] == 1
    assert found["auroc_a"] == metrics.auroc([0, 0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8, 0.7])


def test_different_positive_classes_are_allowed_and_stated(studies, tmp_path):
    """A study of a manifest whose positive label value is another word: compared, with a red warning."""
    other = Path(shutil.copytree(studies["b"], tmp_path / "manifest"))
    raw = yaml.safe_load((other / "spec.yaml").read_text())
    raw["data"] |= {"source": "manifest", "path": "/data/other.csv", "positive": ["opacity"], "negative": ["clear"]}
    (other / "spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    index, table, _ = compare.write([str(studies["a"]), str(other)], str(tmp_path / "out"), measure=False)
    html = Path(index).read_text()
    assert "call different label values positive (a: PNEUMONIA (the source&#x27;s folders or labels); manifest: " \
           "opacity)" in html
    assert "data.source" in pd.read_csv(tmp_path / "out" / "spec_diff.csv")["setting"].tolist()


@pytest.mark.parametrize("case", ["one", "twice", "not_a_study", "unfinished"])
def test_bad_input_is_one_line_and_exit_2(case, studies, tmp_path, capsys):
    a = str(studies["a"])
    if case == "unfinished":
        shutil.copytree(studies["b"], tmp_path / "running", ignore=shutil.ignore_patterns("best.json"))
    dirs = {"one": [a], "twice": [a, a], "not_a_study": [a, str(tmp_path)],
            "unfinished": [a, str(tmp_path / "running")]}
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compare", *dirs[case], "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert {"one": "two or more finished studies", "twice": "given twice", "not_a_study": "not a study directory",
            "unfinished": "no best.json"}[case] in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- two real studies (e2e)

TINY = """
name: tiny{size}
seed: 0
data: {{source: synthetic, image_size: {size}, synthetic_images: 200}}
arms: [lcnet_050]
search_space:
  lr: {{loguniform: [2e-3, 1e-2]}}
fixed: {{batch_size: 32}}
budget: {{samples_per_arm: 2, max_epochs: 2, grace_period: 2}}
resources: {{workers_per_trial: 1, cpus_per_worker: 1, max_concurrent_trials: 2}}
final: {{seeds: [0], bootstrap: 200}}
external:
  - {{name: othersite, source: synthetic, synthetic_images: 100, synthetic_seed: 5, synthetic_shift: 1.0}}
"""


@pytest.fixture(scope="module")
def real(tmp_path_factory, study_env) -> dict:
    """Two finished tiny studies at 24 and 32 px (one arm, two configurations, two epochs, one final seed)
    sharing their synthetic data and an external synthetic site, run one after the other; then compared."""
    root = tmp_path_factory.mktemp("compare-e2e")
    dirs = []
    for size in (24, 32):
        (root / f"tiny{size}.yaml").write_text(TINY.format(size=size))
        run = subprocess.run(CLI + ["study", "run", str(root / f"tiny{size}.yaml"), "--out", str(root / f"tiny{size}"),
                                    "--no-report"], env=study_env, capture_output=True, text=True, timeout=900,
                             start_new_session=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        dirs.append(root / f"tiny{size}")
    out = root / "page"
    run = subprocess.run(CLI + ["compare", *map(str, dirs), "--out", str(out)], env=study_env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {"a": dirs[0], "b": dirs[1], "out": out, "stdout": run.stdout}


@pytest.mark.e2e
def test_real_studies_at_two_sizes_are_paired_on_their_test_split_and_external_set(real):
    a, b, out = real["a"], real["b"], real["out"]
    winners = pd.read_csv(out / "winners.csv")
    assert sorted(winners["set"]) == ["othersite", "test"] and winners["same_fingerprint"].all()
    assert set(winners["images"]) == {len(pd.read_csv(a / "external" / "othersite" / "index.csv")),
                                      int((pd.read_csv(a / "split.csv")["split"] == "test").sum())}
    printed = real["stdout"].splitlines()
    assert len(printed) == 3 and printed[-1] == f"comparison: {out / 'index.html'}"
    assert all(re.match(r"Study tiny32's winner .* tiny24's on (test|othersite): AUROC ", line) for line in printed[:2])
    spec = specs.validate_text((a / "spec.yaml").read_text(), "a")
    _, numbers = compare.winners(compare.load([str(a), str(b)]), ["tiny24", "tiny32"])  # p-values as numbers
    check_against_direct(numbers, a, b, {
        "test": (a / "predictions.csv", b / "predictions.csv", synthetic_keys(a), synthetic_keys(b)),
        "othersite": (a / "external/othersite/predictions.csv", b / "external/othersite/predictions.csv",
                      item_keys(a, "othersite"), item_keys(b, "othersite"))}, spec.final.bootstrap, spec.seed)
    cost = pd.read_csv(out / "cost.csv")
    assert list(cost["study"]) == ["tiny24", "tiny32"] and (cost["images_per_s"] > 0).all()
    assert (cost["parameters_millions"] > 0).all() and (cost["search_compute_s"] > 0).all()


@pytest.mark.e2e
def test_the_comparison_renders_in_headless_chromium(real):
    with headless_tab(viewport={"width": 1280, "height": 2000}) as tab:
        fetched = []
        tab.on("request", lambda r: fetched.append(r.url))
        tab.goto((real["out"] / "index.html").as_uri(), wait_until="load")
        widths = tab.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        headings = tab.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        tables = tab.evaluate("document.querySelectorAll('table').length")
    assert headings == SECTIONS
    assert len(widths) == 1 and widths[0] > 1000  # the cost figure, inlined
    assert tables == 7  # spec diff, held-out sets, winners, two arm tables, cost, tuning
    assert all(u.startswith(("file:", "data:")) for u in fetched), fetched
