"""The study report over a fake finished study (no Ray), partial studies, and in a real browser."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import FAKE_BEST_ARM, headless_tab, write_fake_study
from cxr_ray import report, storage

SECTIONS = ["Verdict", "Internal vs external", "Fairness audit", "Operating points", "Tables", "Figures",
            "Failure cases", "Model card", "Reproduction"]
FIGURES = ["learning_curves", "rung_survival", "test_auroc", "roc", "cost", "sensitivity", "calibration"]
ARMS = ["resnet18", "densenet", "effnet"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished(fake_study_dir) -> Path:
    """The report of the fake finished study, written once for the module."""
    path = report.write(str(fake_study_dir))
    assert path == str(fake_study_dir / "report" / "index.html")
    return fake_study_dir / "report"


def page(report_dir: Path) -> str:
    return (report_dir / "index.html").read_text()


def verdict_paragraph(html: str) -> str:
    section = html.split("<h2>Verdict</h2>", 1)[1].split("<h2>", 1)[0]
    return re.findall(r"<p>(.*?)</p>", section, re.S)[0]


def copy_study(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def test_sections_in_order_and_nothing_missing(finished):
    html, md = page(finished), (finished / "report.md").read_text()
    assert re.findall(r"<h2>(.*?)</h2>", html) == SECTIONS
    assert re.findall(r"^## (.*)$", md, re.M) == SECTIONS
    for text in (html, md):  # a finished study shows everything
        assert "not shown, because" not in text and "could not be" not in text and "is missing" not in text


def test_every_figure_is_a_readable_png(finished):
    for name in FIGURES:
        data = (finished / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.width > 100 and im.height > 100, name


def test_html_is_self_contained(finished):
    html = page(finished)
    uris = re.findall(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(uris) == len(FIGURES) == len(re.findall(r"<img ", html))
    embedded = {base64.b64decode(u) for u in uris}
    assert embedded == {(finished / f"{n}.png").read_bytes() for n in FIGURES}
    assert not re.search(r"""(src|href)\s*=\s*['"]?\s*(https?:)?//""", html)
    assert "<script" not in html and "<link" not in html and "@import" not in html and "url(" not in html


def test_tables_have_the_right_rows(finished, fake_study_dir):
    metrics = pd.read_csv(finished / "final_metrics.csv")
    assert sorted(metrics["arm"]) == sorted(ARMS) and len(metrics) == len(ARMS)
    assert list(metrics["seeds"]) == [3, 3, 3]
    comparison = pd.read_csv(finished / "comparison.csv")
    assert sorted(comparison["arm"]) == sorted(set(ARMS) - {FAKE_BEST_ARM})
    assert set(comparison["versus"]) == {FAKE_BEST_ARM}
    best = pd.read_csv(finished / "best_configs.csv")
    assert sorted(best["arm"]) == sorted(ARMS) and {"lr", "weight_decay"} <= set(best.columns)
    budget = pd.read_csv(finished / "budget.csv")
    assert list(budget["trials"]) == [4, 4, 4]

    trials = pd.read_csv(finished / "trials.csv")
    study_trials = pd.read_csv(fake_study_dir / "trials.csv")
    assert len(trials) == trials["trial_id"].nunique() == study_trials["trial_id"].nunique() == 12
    assert trials["last_val_auroc"].is_monotonic_decreasing
    assert trials["outcome"].str.startswith("stopped by ASHA").any()  # the fake has ASHA stops to show

    split = pd.read_csv(finished / "split.csv").set_index("split")
    assert split.loc["test", "images"] == 60 and split.loc["test", "patients"] == 30


def test_verdict_names_the_arm_the_numbers_say_is_best(finished, fake_study_dir):
    summary = pd.read_csv(fake_study_dir / "summary.csv")
    assert summary.loc[summary["auroc"].idxmax(), "arm"] == FAKE_BEST_ARM  # the fake is built that way
    verdict = verdict_paragraph(page(finished))
    first = min((verdict.index(a), a) for a in ARMS if a in verdict)[1]
    assert first == FAKE_BEST_ARM
    top = summary.loc[summary["auroc"].idxmax()]
    assert f"test AUROC {top['auroc']:.3f} ({top['auroc_ci_low']:.3f}-{top['auroc_ci_high']:.3f})" in verdict
    assert f"accuracy {top['accuracy']:.3f}" in verdict
    assert "significantly worse" in verdict  # the fake's other arms are clearly worse


def test_fairness_audit_lists_the_shared_design(finished, fake_study_dir):
    html = page(finished)
    audit = html.split("<h2>Fairness audit</h2>", 1)[1].split("<h2>", 1)[0]
    spec_hash = json.loads((fake_study_dir / "study.json").read_text())["spec_hash"]
    assert spec_hash in audit and "loguniform [0.0001, 0.01]" in audit and "final seeds 0, 1, 2" in audit
    assert "SYNTHETIC DEMO DATA, NOT MEDICAL DATA" in html
    assert "class='warn'>UNMATCHED" not in html and "different numbers of search trials" not in audit
    arms = pd.read_csv(finished / "arms.csv").set_index("arm")
    assert 10 < arms.loc["resnet18", "parameters (millions)"] < 13  # resnet18 with a one-logit head: 11.2 M


def test_unmatched_spec_gets_a_red_box_with_each_arms_settings(tmp_path):
    html = page(Path(report.write(str(write_fake_study(tmp_path / "unmatched", unmatched=True)))).parent)
    box = re.search(r"<div class='warn'>(UNMATCHED SPEC.*?)</div>", html, re.S)
    assert box, "no red box for an unmatched spec"
    for arm_settings in ("resnet18: optimizer=sgd, lr=0.01, epochs=4", "densenet: optimizer=adam, lr=0.0003, epochs=3",
                         "effnet: optimizer=adamw, lr=0.001, epochs=2"):
        assert arm_settings in box.group(1)
    assert "UNMATCHED STUDY" in html.split("<h2>Fairness audit</h2>")[0]  # the verdict says so too
    assert "against its weight_decay" in html  # no lr searched: sensitivity to the first numeric parameter


def test_departures_from_the_fair_design_are_flagged(finished, fake_study_dir, tmp_path):
    sdir = copy_study(fake_study_dir, tmp_path / "study")
    budget = pd.read_csv(sdir / "budget.csv")
    budget.loc[budget["arm"] == "effnet", "trials"] = 3
    budget.to_csv(sdir / "budget.csv", index=False)
    final = pd.read_csv(sdir / "final.csv")
    final[~((final["arm"] == "resnet18") & (final["seed"] == 2))].to_csv(sdir / "final.csv", index=False)
    study = json.loads((sdir / "study.json").read_text())
    (sdir / "study.json").write_text(json.dumps(study | {"spec_hash": "0123456789ab"}))
    (sdir / "data_report.json").write_text(json.dumps({"source": "kaggle", "path": "/data/chest_xray"}))
    spec_text = (sdir / "spec.yaml").read_text()
    (sdir / "spec.yaml").write_text(spec_text.replace("bootstrap: 100", "bootstrap: 200"))  # edited after the run

    html = page(Path(report.write(str(sdir))).parent)
    warnings = " ".join(re.findall(r"<div class='warn'>(.*?)</div>", html, re.S))
    assert "different numbers of search trials" in warnings and "effnet 3" in warnings
    assert "Missing final runs: resnet18 seed 2" in warnings
    assert "study.json records spec hash 0123456789ab" in warnings
    assert "this cxr_ray resolves its content to" in warnings  # reported, not refused
    assert "SYNTHETIC DEMO DATA" not in html  # real data: no banner


PARTIAL = {
    # name: (files kept or dropped, what the report must say)
    "only data, spec and trials": (
        {"keep": ("spec.yaml", "split.csv", "trials.csv")},
        ["Final evaluation not run yet: summary.csv is missing", "budget.csv is missing",
         "predictions.csv is missing", "study.json is missing"]),
    "data prepared, search running": (
        {"keep": ("spec.yaml", "split.csv", "data_report.json", "configs.csv", "asha_state.json")},
        ["Final evaluation not run yet", "The search has not finished either (trial_summary.csv is missing",
         "cxr-ray study status"]),
    "search done, no final evaluation": (
        {"drop": ("final.csv", "summary.csv", "comparison.csv", "best.json", "predictions.csv", "study.json")},
        ["Final evaluation not run yet", "Search results so far, best validation AUROC per arm: densenet",
         "summary.csv is missing (it is written by the final evaluation)"]),
    "killed before best.json": (
        {"drop": ("best.json", "study.json")},
        ["No model chosen to serve yet: best.json is missing",
         "Calibration of the best model: not shown, because best.json is missing"]),
    "no asha state": ({"drop": ("asha_state.json",)}, ["Stop points not marked: asha_state.json is missing"]),
}


@pytest.mark.parametrize("variant", list(PARTIAL))
def test_partial_study_reports_what_is_missing(finished, fake_study_dir, tmp_path, variant):
    files, expected = PARTIAL[variant]
    sdir = copy_study(fake_study_dir, tmp_path / "study")  # with the finished report in it
    for f in sdir.iterdir():
        if f.is_file() and (f.name in files.get("drop", ()) or ("keep" in files and f.name not in files["keep"])):
            f.unlink()
    path = Path(report.write(str(sdir)))
    html, md = path.read_text(), (path.parent / "report.md").read_text()
    assert re.findall(r"<h2>(.*?)</h2>", html) == SECTIONS
    flat = re.sub(r"\s+", " ", html)
    for sentence in expected:
        assert sentence in flat and sentence.split(" (")[0] in md, sentence
    assert "could not be shown" not in html  # every gap is explained, none is an error
    drawn = set(re.findall(r"alt='(\w+)'", html))
    assert drawn == {p.stem for p in path.parent.glob("*.png")}  # figures of the old report did not survive


def test_empty_trials_and_unreadable_files(fake_study_dir, tmp_path):
    sdir = copy_study(fake_study_dir, tmp_path / "study", drop=("trial_summary.csv", "budget.csv"))
    columns = pd.read_csv(sdir / "trials.csv", nrows=0).columns
    pd.DataFrame(columns=columns).to_csv(sdir / "trials.csv", index=False)  # a search whose trials all failed
    (sdir / "asha_state.json").write_text('{"rungs": {')  # cut off mid-write
    (sdir / "final_trials.csv").write_text("")
    html = re.sub(r"\s+", " ", Path(report.write(str(sdir))).read_text())
    assert "Learning curves: not shown, because trials.csv holds no epoch results yet" in html
    assert "asha_state.json could not be read" in html
    assert "could not be shown" not in html


def test_not_a_study_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no spec.yaml"):
        report.write(str(tmp_path))


def test_remote_study_uploads_under_report(fake_study_dir, tmp_path, monkeypatch):
    """The object-store path, exercised on local disk: storage treats every path as remote."""
    sdir = copy_study(fake_study_dir, tmp_path / "study")
    shutil.rmtree(sdir / "report")
    (sdir / "report").mkdir()  # object stores have no folders; pyarrow's local filesystem needs one
    monkeypatch.setattr(storage, "is_remote", lambda uri: True)
    uri = report.write(str(sdir))
    assert uri == storage.join(str(sdir), "report", "index.html")
    assert {f"{n}.png" for n in FIGURES} <= {p.name for p in (sdir / "report").iterdir()}
    assert not list(sdir.glob(".report-*"))


def test_report_renders_in_headless_chromium(finished, tmp_path):
    with headless_tab(viewport={"width": 1280, "height": 4000}) as tab:
        requests = []
        tab.on("request", lambda r: requests.append(r.url))
        tab.goto((finished / "index.html").as_uri(), wait_until="load")
        widths = tab.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        headings = tab.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        shot = tab.screenshot(full_page=True)
    assert len(widths) == len(FIGURES) and all(w > 100 for w in widths), widths
    assert headings == SECTIONS
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # nothing fetched from a network
    assert shot.startswith(PNG_SIGNATURE) and len(shot) > 50_000
    (tmp_path / "shot.png").write_bytes(shot)
    with Image.open(tmp_path / "shot.png") as im:
        assert im.width == 1280 and im.height > 4000  # the whole page: text, tables and seven figures


def test_a_bootstrap_p_value_of_zero_reads_as_below_its_resolution(finished, fake_study_dir):
    """The fake's weaker arms differ in every resample (p = 0 of 100): the tables say p < 1/B, as the
    verdict does, never p = 0."""
    study = pd.read_csv(fake_study_dir / "comparison.csv")
    assert (study["p_holm"] == 0).all() and (study["p_bootstrap"] == 0).all()  # the numbers stay numbers
    shown = pd.read_csv(finished / "comparison.csv")
    assert list(shown["p_holm"]) == list(shown["p_bootstrap"]) == ["< 0.01"] * len(study)
    table = page(finished).split("Paired comparison with the best arm", 1)[1].split("</table>", 1)[0]
    assert table.count("&lt; 0.01") == 2 * len(study) and "<td>0</td>" not in table
