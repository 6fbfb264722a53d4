"""The `cxr-ray` command line: clear errors (exit code 2, message naming the input) and data commands."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from cxr_ray import cli


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


def test_status_and_resume_refuse_a_non_study(capsys, tmp_path):
    for command in ("status", "resume"):
        code, _, err = run(capsys, "study", command, str(tmp_path))
        assert code == 2 and "not a study directory" in err


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
