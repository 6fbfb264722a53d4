"""The `cxr-ray` command line: clear errors (exit code 2, message naming the input) and data commands."""
from __future__ import annotations

import importlib
import json
import shutil
import socket
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO_ROOT
from cxr_ray import cli
from cxr_ray.errors import CxrError


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_missing_data_path_is_named(capsys, tmp_path):
    code, _, err = run(capsys, "data", "check", "--source", "kaggle", "--path", str(tmp_path / "nowhere"))
    assert code == 2 and f"{tmp_path / 'nowhere'}: no such file or directory" in err


def test_unknown_source_lists_the_choices(capsys):
    code, _, err = run(capsys, "data", "check", "--source", "dicomdir", "--path", "x")
    assert code == 2 and "invalid choice: 'dicomdir'" in err and "kaggle" in err and "synthetic" in err


def test_folder_without_kaggle_layout_is_explained(capsys, tmp_path):
    (tmp_path / "images").mkdir()
    code, _, err = run(capsys, "data", "check", "--source", "kaggle", "--path", str(tmp_path))
    assert code == 2 and "no Kaggle layout found" in err and "train/NORMAL" in err


def test_data_check_json_and_prepare_write_what_they_promise(capsys, kaggle_tree, tmp_path):
    code, out, _ = run(capsys, "data", "check", "--source", "kaggle", "--path", str(kaggle_tree.root), "--json",
                       "--size", "32", "--cache", str(tmp_path / "cache"))
    assert code == 0
    report = json.loads(out)
    assert report["images"] == len(kaggle_tree.labels) and "leakage_in_source_splits" in report
    code, out, _ = run(capsys, "data", "prepare", "--source", "kaggle", "--path", str(kaggle_tree.root), "--size",
                       "32", "--out", str(tmp_path / "prep"), "--cache", str(tmp_path / "cache"))
    assert code == 0 and "patients" in out
    split = pd.read_csv(tmp_path / "prep" / "split.csv")
    assert set(split.columns) >= {"item", "split", "patient", "label", "sha1"}


def test_spec_errors_name_the_file_and_key(capsys, tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\ndata: {source: synthetic}\narms: [resnet18]\nbudget: {samples_per_arm: 2, "
                    "max_epoch: 3}\n")
    code, _, err = run(capsys, "study", "run", str(spec), "--out", str(tmp_path / "out"))
    assert code == 2 and str(spec) in err and "budget.max_epoch" in err
    assert not (tmp_path / "out").exists()  # nothing half-written
    code, _, err = run(capsys, "study", "run", str(tmp_path / "missing.yaml"))
    assert code == 2 and "no such spec file" in err


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_every_command_refuses_a_non_study_in_the_same_words(capsys, tmp_path):
    here = str(tmp_path)
    for argv in (["study", "status", here], ["study", "resume", here], ["report", here],
                 ["serve", here, "--port", free_port()], ["evaluate", here, "--external", "x=/nowhere"],
                 ["calibrate", here, "--name", "x", "--path", "/nowhere"], ["compare", here, here]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err == f"error: {here}: not a study directory (no spec.yaml)\n", (argv, err)


def test_not_a_study_directory_is_one_exception_type(tmp_path):
    from cxr_ray import results, status, study, study_layout
    for read in (status.status, study.resume, results.Study, study_layout.finished_study):
        with pytest.raises(study_layout.NotAStudy, match="not a study directory"):
            read(str(tmp_path))


def test_a_serve_time_policy_the_validation_scores_cannot_fit_is_one_line(capsys, fake_study_dir, tmp_path):
    """`serve --threshold-policy calibrated` where no increasing Platt fit exists (validation scores
    that rank the classes backwards): exit 2 with one line naming the study and the policy, before
    anything starts (this was a traceback)."""
    study = shutil.copytree(fake_study_dir, tmp_path / "backwards")
    val = pd.read_csv(study / "validation_predictions.csv")
    val.assign(probability=1 - val["probability"]).to_csv(study / "validation_predictions.csv", index=False)
    code, out, err = run(capsys, "serve", str(study), "--threshold-policy", "calibrated", "--port", free_port())
    assert code == 2 and not out and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {study}: threshold policy calibrated") and "no increasing calibration" in err


# Exceptions that never reach the command line, and where they are told instead.
TOLD_ELSEWHERE = {"RequestError": "a 4xx answered to an HTTP client (serve_limits)",
                  "Missing": "a part of the report left out, with the reason in the report (results)"}


def test_every_error_a_user_can_act_on_is_a_cxr_error():
    """errors.py's rule: the CLI prints a CxrError as one line and exits 2; any other exception
    escapes as a traceback."""
    errors = {}
    for path in sorted((REPO_ROOT / "cxr_ray").glob("*.py")):
        module = importlib.import_module(f"cxr_ray.{path.stem}")
        errors |= {name: obj for name, obj in vars(module).items() if isinstance(obj, type)
                   and issubclass(obj, Exception) and obj.__module__ == module.__name__}
    assert {"ImageError", "MetricError", "SpecError", "ServingError"} <= set(errors)
    assert sorted(n for n, e in errors.items() if not issubclass(e, CxrError) and n not in TOLD_ELSEWHERE) == []


def test_train_rejects_unknown_setting_before_starting_ray(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--set", "learning_rate=0.1", "--out", str(tmp_path))
    assert code == 2 and "learning_rate" in err and "lr" in err
    code, _, err = run(capsys, "train", "--set", "lr", "--out", str(tmp_path))
    assert code == 2 and "KEY=VALUE" in err


LIGHT = """
import sys
from cxr_ray import cli
try:
    cli.main(sys.argv[1:])
except SystemExit as e:
    assert not e.code, e.code
heavy = sorted(m for m in ("torch", "ray.train", "ray.tune", "timm") if m in sys.modules)
print("HEAVY", ",".join(heavy))
"""


@pytest.mark.parametrize("argv", [["--help"], ["study", "status", "STUDY"], ["report", "STUDY"]],
                         ids=["help", "status", "report"])
def test_reading_commands_import_neither_torch_nor_ray_train(argv, fake_study_dir, tmp_path):
    """`cxr-ray --help`, `study status` and `report` answer without loading the training stack."""
    study = shutil.copytree(fake_study_dir, tmp_path / "fake")
    argv = [str(study) if a == "STUDY" else a for a in argv]
    out = subprocess.run([sys.executable, "-c", LIGHT, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    heavy = next(ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("HEAVY"))
    assert heavy.removeprefix("HEAVY").strip() == "", heavy
