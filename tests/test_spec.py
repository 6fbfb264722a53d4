"""Study specs: every mistake is a SpecError naming the file and the key; fairness is enforced;
valid specs resolve, hash and round-trip; all arms share the same sampled configurations."""
from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from cxr_ray import spec as specs
from cxr_ray import study
from cxr_ray.spec import SpecError, draw_configs, load, sample_configs, trial_config

REPO_ROOT = Path(__file__).resolve().parent.parent
STUDIES = REPO_ROOT / "studies"

# A small valid spec; tests derive variants from it.
BASE = {
    "name": "unit",
    "data": {"source": "synthetic"},
    "arms": ["resnet18", "densenet121"],
    "search_space": {"lr": {"loguniform": [1e-4, 1e-2]}, "weight_decay": {"loguniform": [1e-6, 1e-3]}},
    "fixed": {"batch_size": 32},
    "budget": {"samples_per_arm": 4, "max_epochs": 4},
}
DELETE = object()


def variant(changes: dict | None = None) -> dict:
    """BASE with dotted-path changes applied ("budget.max_epochs": 0; DELETE removes the key)."""
    raw = copy.deepcopy(BASE)
    for dotted, value in (changes or {}).items():
        *parents, last = dotted.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = copy.deepcopy(value)
    return raw


def write(tmp_path: Path, raw: dict | str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


def expect_error(path: Path, *patterns: str) -> str:
    """load(path) raises SpecError whose message names the file and matches every regex."""
    with pytest.raises(SpecError) as info:
        load(path)
    msg = str(info.value)
    assert str(path) in msg, f"message does not name the file: {msg}"
    for pattern in patterns:
        assert re.search(pattern, msg), f"message does not match {pattern!r}: {msg}"
    return msg


# ----------------------------------------------------------------------------- errors

ERRORS = {
    # unknown keys
    "unknown top-level key": ({"optimiser": "adam"}, [r"\boptimiser\b"]),
    "unknown budget key (typo)": ({"budget.max_epochs": DELETE, "budget.max_epoch": 4},
                                  [r"unknown key budget\.max_epoch\b"]),
    "unknown data key": ({"data.colour": "grey"}, [r"data\.colour\b"]),
    "unknown resources key": ({"resources": {"gpus": 1}}, [r"resources\.gpus\b"]),
    "unknown fixed key": ({"fixed.learning_rate": 0.1}, [r"fixed\.learning_rate\b"]),
    "unknown search_space key": ({"search_space.learning_rate": {"uniform": [0.1, 0.2]}},
                                 [r"search_space\.learning_rate\b"]),
    # missing required keys
    "missing budget.samples_per_arm": ({"budget.samples_per_arm": DELETE}, [r"missing.*budget\.samples_per_arm\b"]),
    "missing budget.max_epochs": ({"budget.max_epochs": DELETE}, [r"missing.*budget\.max_epochs\b"]),
    "missing budget section": ({"budget": DELETE}, [r"missing.*budget\.samples_per_arm\b"]),
    "missing data.source": ({"data": {"image_size": 32}}, [r"missing.*data\.source\b"]),
    "missing arms": ({"arms": DELETE}, [r"\barms\b"]),
    # wrong types
    "image_size as a string": ({"data.image_size": "64"}, [r"data\.image_size\b", r"\bint\b"]),
    "max_concurrent_trials as a float": ({"resources.max_concurrent_trials": 1.5},
                                         [r"resources\.max_concurrent_trials\b", r"\bint\b"]),
    "bool for samples_per_arm": ({"budget.samples_per_arm": True}, [r"budget\.samples_per_arm\b"]),
    "bool for max_epochs": ({"budget.max_epochs": True}, [r"budget\.max_epochs\b"]),
    "bool for reduction_factor": ({"budget.reduction_factor": True}, [r"budget\.reduction_factor\b"]),
    "bool for seed": ({"seed": True}, [r"\bseed\b"]),
    "string for unmatched": ({"unmatched": "yes"}, [r"\bunmatched\b"]),
    "string for a fixed float": ({"fixed.lr": "0.1"}, [r"fixed\.lr\b"]),
    "float for a fixed int": ({"fixed.batch_size": 32.5}, [r"fixed\.batch_size\b"]),
    "bool for a fixed choice": ({"fixed.augment": True}, [r"fixed\.augment\b"]),
    "unknown augmentation": ({"fixed.augment": "heavy"}, [r"\baugment\b", r"none, mild, strong"]),
    "section not a mapping": ({"budget": [4, 4]}, [r"\bbudget\b"]),
    "final.seeds not integers": ({"final": {"seeds": [0, 1.5]}}, [r"final\.seeds\b"]),
    # impossible budgets
    "grace_period > max_epochs": ({"budget.grace_period": 5}, [r"budget\.grace_period\b"]),
    "samples_per_arm 0": ({"budget.samples_per_arm": 0}, [r"budget\.samples_per_arm\b"]),
    "reduction_factor 1": ({"budget.reduction_factor": 1}, [r"budget\.reduction_factor\b"]),
    "reduction_factor 0.5": ({"budget.reduction_factor": 0.5}, [r"budget\.reduction_factor\b"]),
    "max_epochs 0": ({"budget.max_epochs": 0}, [r"budget\.max_epochs\b"]),
    "grace_period 0": ({"budget.grace_period": 0}, [r"budget\.grace_period\b"]),
    "final.epochs 0": ({"final": {"epochs": 0}}, [r"final\.epochs\b"]),
    # fairness: arms choose only their backbone and weights
    "arm overrides lr": ({"arms": [{"backbone": "resnet18", "lr": 0.1}, "densenet121"]}, [r"arms\[0\]\.lr\b"]),
    "second arm overrides optimizer": ({"arms": ["resnet18", {"backbone": "densenet121", "optimizer": "sgd"}]},
                                       [r"arms\[1\]\.optimizer\b"]),
    "arm overrides epochs": ({"arms": ["resnet18", {"backbone": "densenet121", "epochs": 9}]},
                             [r"arms\[1\]\.epochs\b"]),
    "arm settings in a matched spec": ({"arms": [{"backbone": "resnet18", "settings": {"epochs": 2}}, "densenet121"]},
                                       [r"arms\[0\]\.settings\b"]),
    "arm with unknown key": ({"arms": [{"backbone": "resnet18", "colour": "red"}]}, [r"arms\[0\]", r"\bcolour\b"]),
    "arm without backbone": ({"arms": [{"name": "x"}]}, [r"arms\[0\]", r"\bbackbone\b"]),
    "search_space sets epochs": ({"search_space.epochs": {"randint": [2, 4]}}, [r"search_space\.epochs\b"]),
    "search_space sets seed": ({"search_space.seed": {"choice": [0, 1]}}, [r"search_space\.seed\b"]),
    "search_space sets backbone": ({"search_space.backbone": {"choice": ["resnet18"]}},
                                   [r"search_space\.backbone\b"]),
    "search_space sets image_size": ({"search_space.image_size": {"choice": [32, 64]}},
                                     [r"search_space\.image_size\b"]),
    "fixed sets epochs": ({"fixed.epochs": 2}, [r"fixed\.epochs\b"]),
    "fixed sets seed": ({"fixed.seed": 3}, [r"fixed\.seed\b"]),
    "fixed sets backbone": ({"fixed.backbone": "resnet50"}, [r"fixed\.backbone\b"]),
    "fixed sets image_size": ({"fixed.image_size": 128}, [r"fixed\.image_size\b"]),
    "model sets epochs": ({"model": {"epochs": 3}}, [r"model\.epochs\b"]),
    "key both fixed and searched": ({"fixed.lr": 0.01}, [r"search_space\.lr\b", r"fixed"]),
    "key both in model and searched": ({"model": {"dropout": 0.2}, "search_space.dropout": {"uniform": [0.1, 0.5]}},
                                       [r"search_space\.dropout\b"]),
    # distributions
    "loguniform low 0": ({"search_space.lr": {"loguniform": [0, 1e-2]}}, [r"search_space\.lr\b", r"low > 0"]),
    "loguniform low < 0": ({"search_space.lr": {"loguniform": [-1e-3, 1e-2]}}, [r"search_space\.lr\b"]),
    "low > high": ({"search_space.lr": {"loguniform": [1e-2, 1e-4]}}, [r"search_space\.lr\b", r"low < high"]),
    "low == high": ({"search_space.dropout": {"uniform": [0.3, 0.3]}}, [r"search_space\.dropout\b"]),
    "unknown distribution": ({"search_space.lr": {"normal": [1e-3, 1e-4]}}, [r"search_space\.lr\b"]),
    "two distributions": ({"search_space.lr": {"uniform": [0.1, 0.2], "loguniform": [0.1, 0.2]}},
                          [r"search_space\.lr\b"]),
    "range not a pair": ({"search_space.lr": {"uniform": [0.1]}}, [r"search_space\.lr\b"]),
    "empty choice": ({"search_space.optimizer": {"choice": []}}, [r"search_space\.optimizer\b"]),
    "choice option of the wrong type": ({"search_space.batch_size": {"choice": [32, "64"]},
                                         "fixed": {}}, [r"search_space\.batch_size\[1\]"]),
    "uniform on an int setting": ({"search_space.batch_size": {"uniform": [16, 64]}, "fixed": {}},
                                  [r"search_space\.batch_size\b", r"randint"]),
    # data, arms, seeds
    "unknown data.source": ({"data.source": "dicom"}, [r"data\.source\b", r"dicom"]),
    "kaggle without a path": ({"data.source": "kaggle"}, [r"data\.path\b"]),
    "image_size out of range": ({"data.image_size": 8}, [r"data\.image_size\b"]),
    "val_fraction out of range": ({"data.val_fraction": 0.6}, [r"data\.val_fraction\b"]),
    "manifest without a path": ({"data.source": "manifest"}, [r"data\.path\b"]),
    "unknown manifest role": ({"data": {"source": "manifest", "path": "m.csv", "columns": {"diagnosis": "x"}}},
                              [r"unknown key data\.columns\.diagnosis\b", r"path, label, patient, split, site"]),
    "manifest column not a name": ({"data": {"source": "manifest", "path": "m.csv", "columns": {"patient": 3}}},
                                   [r"data\.columns\.patient\b", r"'image'"]),
    "a value both positive and negative": ({"data": {"source": "manifest", "path": "m.csv", "positive": [1, "yes"],
                                                     "negative": ["1.0", "no"]}},
                                           [r"data\.positive and data\.negative share the value\(s\) 1"]),
    "empty positive": ({"data": {"source": "manifest", "path": "m.csv", "positive": []}}, [r"data\.positive\b"]),
    "columns for a non-manifest source": ({"data.columns": {"label": "y"}},
                                          [r"data\.columns is only read for source manifest"]),
    "root for an external folder": ({"external": [{"name": "x", "source": "kaggle", "path": "/d", "root": "/d"}]},
                                    [r"external\[0\]\.root is only read for source manifest"]),
    "cache on object storage": ({"data.cache": "s3://bucket/cache"}, [r"data\.cache must be a filesystem path"]),
    "no synthetic images": ({"data.synthetic_images": 0}, [r"data: synthetic images must be >= 1 \(got 0\)"]),
    "a negative site shift": ({"external": [{"name": "x", "source": "synthetic", "synthetic_shift": -1}]},
                              [r"external\[0\]: synthetic shift must be >= 0 \(got -1\)"]),
    "duplicate arm names": ({"arms": ["resnet18", {"name": "resnet18", "backbone": "densenet121"}]},
                            [r"arms\[1\]", r"duplicate", r"resnet18"]),
    "same backbone twice": ({"arms": ["resnet18", "resnet18"]}, [r"arms\[1\]", r"duplicate"]),
    "duplicate final seeds": ({"final": {"seeds": [0, 1, 0]}}, [r"final\.seeds\b", r"duplicate"]),
    "empty final seeds": ({"final": {"seeds": []}}, [r"final\.seeds\b"]),
    "unknown selection metric": ({"selection": {"metric": "auc"}}, [r"selection\.metric\b"]),
    "bad selection mode": ({"selection": {"mode": "maximum"}}, [r"selection\.mode\b"]),
    "bad name": ({"name": "my study!"}, [r"\bname\b"]),
    # values only TrainConfig knows are invalid
    "fixed optimizer rmsprop": ({"fixed.optimizer": "rmsprop"}, [r"\boptimizer\b", r"rmsprop"]),
    "fixed dropout 1": ({"fixed.dropout": 1.0}, [r"\bdropout\b"]),
    "unknown head": ({"model": {"head": "mlp"}}, [r"\bhead\b"]),
    "fixed lr 0": ({"fixed.lr": 0, "search_space.lr": DELETE}, [r"\blr\b"]),
}


@pytest.mark.parametrize("changes, patterns", list(ERRORS.values()), ids=list(ERRORS))
def test_error_names_file_and_key(tmp_path, changes, patterns):
    expect_error(write(tmp_path, variant(changes)), *patterns)


def test_base_spec_is_valid(tmp_path):
    """The error cases above differ from BASE only by the change under test."""
    spec = load(write(tmp_path, variant()))
    assert spec.arm_names == ["resnet18", "densenet121"]


def test_missing_file_and_invalid_yaml_name_the_file(tmp_path):
    expect_error(tmp_path / "absent.yaml", "no such spec file")
    expect_error(write(tmp_path, "name: [unclosed\n"), "not valid YAML")
    expect_error(write(tmp_path, "- just\n- a list\n", "list.yaml"), "mapping")


def _choice_seed(options: list, avoid: str) -> int:
    """A spec seed whose every sampled configuration (samples_per_arm 2) avoids ``avoid``."""
    for seed in range(50):
        raw = variant({"seed": seed, "budget.samples_per_arm": 2, "search_space.optimizer": {"choice": options}})
        if all(c["optimizer"] != avoid for c in draw_configs(raw["search_space"], 2, seed)):
            return seed
    raise AssertionError("no seed avoids the option")


def test_invalid_choice_option_is_an_error_even_when_not_sampled(tmp_path):
    options = ["adam", "rmsprop"]
    seed = _choice_seed(options, "rmsprop")
    raw = variant({"seed": seed, "budget.samples_per_arm": 2, "search_space.optimizer": {"choice": options}})
    expect_error(write(tmp_path, raw), r"\boptimizer\b", r"rmsprop")


def test_every_sampled_configuration_is_validated(tmp_path):
    """A range that is partly invalid (dropout >= 1) is caught when any of the samples the study
    will train falls outside, not first at search time (ConfigError from search_plans)."""
    space = {"dropout": {"uniform": [0.0, 1.6]}}
    for seed in range(50):
        raw = variant({"seed": seed, "budget.samples_per_arm": 6, "search_space": space})
        drawn = [c["dropout"] for c in draw_configs(space, 6, seed)]
        if drawn[0] < 1 and max(drawn) >= 1:
            break
    else:
        raise AssertionError("no seed with a valid first and an invalid later sample")
    expect_error(write(tmp_path, raw), r"\bdropout\b")


def test_a_manifest_spec_resolves_its_format(tmp_path):
    """Column names, label values and root reach the ManifestFormat every loader reads, for the study's
    data and for an external set alike."""
    raw = variant({"data": {"source": "manifest", "path": "/d/m.csv", "columns": {"label": "Target", "patient": "image"},
                            "positive": [1, "yes"], "negative": [0], "root": "/d"},
                   "external": [{"name": "b", "source": "manifest", "path": "/e/m.parquet", "split": "test"}]})
    spec = load(write(tmp_path, raw))
    fmt = spec.data.manifest_format
    assert fmt.columns == {"label": "Target", "patient": "image"} and fmt.column("label") == "Target"
    assert fmt.column("path") == "path" and fmt.positive == ("1", "yes") and fmt.negative == ("0",) and fmt.root == "/d"
    assert spec.external[0].manifest_format.positive == ("1", "PNEUMONIA") and spec.external[0].split == "test"
    assert specs.validate_text(specs.dump(spec), "spec.yaml").raw == spec.raw


def test_the_synthetic_parameters_are_one_typed_value(tmp_path):
    from cxr_ray.synthetic import SyntheticSet
    raw = variant({"data.synthetic_images": 200, "external": [{"name": "b", "source": "synthetic",
                                                                "synthetic_seed": 5, "synthetic_shift": 1.0}]})
    spec = load(write(tmp_path, raw))
    assert spec.data.synthetic_set == SyntheticSet(200, 0, 0.0)
    assert spec.external[0].synthetic_set == SyntheticSet(300, 5, 1.0)
    assert spec.external[0].synthetic_set.site == "synthetic-5-shift1"


def test_data_path_replaces_the_spec_path(tmp_path):
    """--data-path: the same spec on another machine's copy of the data."""
    path = write(tmp_path, variant({"data": {"source": "kaggle", "path": "/data/chest_xray"}}))
    assert load(path).data.path == "/data/chest_xray"
    assert load(path, "/mnt/other/chest_xray").data.path == "/mnt/other/chest_xray"
    missing = write(tmp_path, variant({"data": {"source": "kaggle"}}), "missing.yaml")
    expect_error(missing, r"data\.path\b")
    assert load(missing, "/mnt/x").data.path == "/mnt/x"
    assert load(path, None).data.path == "/data/chest_xray"  # no override: the spec's own path


# ----------------------------------------------------------------------------- YAML numbers

def test_exponent_numbers_without_a_dot_are_floats(tmp_path):
    text = """
name: floats
data: {source: synthetic}
arms: [resnet18]
search_space:
  lr: {loguniform: [1e-4, 5E-2]}
fixed: {weight_decay: 1e-5, momentum: 95e-2, batch_size: 16}
budget: {samples_per_arm: 2, max_epochs: 2}
"""
    assert yaml.safe_load(text)["fixed"]["weight_decay"] == "1e-5"  # why the project has its own loader
    spec = load(write(tmp_path, text))
    low, high = spec.search_space["lr"]["loguniform"]
    assert (low, high) == (1e-4, 5e-2) and isinstance(low, float) and isinstance(high, float)
    assert spec.fixed["weight_decay"] == 1e-5 and isinstance(spec.fixed["weight_decay"], float)
    assert spec.fixed["momentum"] == pytest.approx(0.95)
    assert spec.fixed["batch_size"] == 16 and isinstance(spec.fixed["batch_size"], int)
    assert specs.yaml_load("a: -2e3\nb: +1.5e-2\nc: resnet18\nd: 3\ne: 1e\n") == {
        "a": -2000.0, "b": 0.015, "c": "resnet18", "d": 3, "e": "1e"}


# ----------------------------------------------------------------------------- valid specs

VALID = """
name: valid
description: two arms, shared space
seed: 3
data: {source: synthetic, image_size: 32}
model: {head: linear, pretrained: true}
arms:
  - resnet18
  - {name: dn121-local, backbone: densenet121, pretrained: /weights/densenet121.safetensors}
  - efficientnet_b0
search_space:
  lr: {loguniform: [1e-4, 1e-1]}
  dropout: {uniform: [0.1, 0.6]}
  optimizer: {choice: [adam, adamw, sgd]}
  hidden: {randint: [8, 10]}
fixed: {batch_size: 32, weight_decay: 1e-4}
budget: {samples_per_arm: 12, max_epochs: 6, grace_period: 2}
final: {seeds: [0, 1], epochs: 8}
"""


@pytest.fixture
def valid_path(tmp_path) -> Path:
    return write(tmp_path, VALID, "valid.yaml")


def test_a_minimal_spec_resolves_to_a_complete_self_describing_one(tmp_path):
    """The study directory's spec.yaml holds every setting, defaults included, so the study can be
    read and resumed without the original file or this version's defaults."""
    minimal = {"name": "minimal", "data": {"source": "synthetic"}, "arms": ["resnet18"],
               "budget": {"samples_per_arm": 2, "max_epochs": 3}}
    spec = load(write(tmp_path, minimal))
    dumped = yaml.safe_load(specs.dump(spec))
    for section, cls in specs.SECTIONS.items():
        assert set(dumped[section]) == {f.name for f in dataclasses.fields(cls)}, section
    assert specs.validate_text(specs.dump(spec), "spec.yaml").raw == spec.raw
    # what the README promises of a spec that says nothing else
    assert spec.selection.metric == "val_auroc" and spec.selection.mode == "max" and spec.selection.sign == 1
    assert spec.final.seeds == [0, 1, 2] and spec.final_epochs_for("resnet18") == 3 == spec.epochs_for("resnet18")
    assert spec.engine == "tune"  # one worker per trial: the loop runs inside the Tune trial
    assert spec.budget.milestones == [1, 2]
    assert load(write(tmp_path, variant({"resources.workers_per_trial": 2}), "ddp.yaml")).engine == "train"


def test_defaults_are_not_shared_between_specs(tmp_path):
    a = load(write(tmp_path, variant(), "a.yaml"))
    a.final.seeds.append(99)
    assert load(write(tmp_path, variant(), "b.yaml")).final.seeds == [0, 1, 2]


def test_arms_names_and_pretrained(valid_path):
    spec = load(valid_path)
    assert spec.arm_names == ["resnet18", "dn121-local", "efficientnet_b0"]
    assert spec.arm("resnet18") == specs.Arm("resnet18", "resnet18", True)
    assert spec.arm("efficientnet_b0").pretrained is True  # model.pretrained carried to every arm
    assert spec.arm("dn121-local") == specs.Arm("dn121-local", "densenet121", "/weights/densenet121.safetensors")
    assert "pretrained" not in spec.model  # now per arm only
    cfg = trial_config(spec, "dn121-local", sample_configs(spec, 1)[0], seed=0)
    assert cfg.backbone == "densenet121" and cfg.pretrained == "/weights/densenet121.safetensors"
    assert cfg.image_size == 32 and cfg.epochs == 6 and cfg.arm == "dn121-local" and cfg.study == "valid"
    assert cfg.spec_hash == spec.hash


def test_final_epochs(valid_path):
    spec = load(valid_path)
    assert spec.epochs_for("resnet18") == 6
    assert spec.final_epochs_for("resnet18") == 8


def test_hash_is_stable(valid_path):
    a, b = load(valid_path), load(valid_path)
    assert re.fullmatch(r"[0-9a-f]{12}", a.hash)
    assert a.hash == b.hash


def test_explicit_defaults_give_the_same_hash(tmp_path):
    implicit = load(write(tmp_path, variant(), "a.yaml"))
    explicit = load(write(tmp_path, variant({"budget.grace_period": 1, "seed": 0, "resources.max_failures": 2}),
                          "b.yaml"))
    assert implicit.hash == explicit.hash


HASH_CHANGES = {
    "seed": {"seed": 1},
    "search range": {"search_space.lr": {"loguniform": [1e-4, 1e-1]}},
    "fixed value": {"fixed.batch_size": 64},
    "max_epochs": {"budget.max_epochs": 5},
    "samples": {"budget.samples_per_arm": 5},
    "image_size": {"data.image_size": 32},
    "final seeds": {"final": {"seeds": [0, 1]}},
    "arm order": {"arms": ["densenet121", "resnet18"]},
    "arm weights": {"arms": ["resnet18", {"backbone": "densenet121", "pretrained": True}]},
    "metric": {"selection": {"metric": "val_loss", "mode": "min"}},
    "name": {"name": "unit2"},
}


def test_hash_changes_with_every_value(tmp_path):
    base = load(write(tmp_path, variant(), "base.yaml")).hash
    hashes = {base}
    for i, (what, changes) in enumerate(HASH_CHANGES.items()):
        h = load(write(tmp_path, variant(changes), f"v{i}.yaml")).hash
        assert h != base, what
        hashes.add(h)
    assert len(hashes) == len(HASH_CHANGES) + 1


@pytest.mark.parametrize("text", [VALID, VALID.replace("name: valid", "name: valid\nunmatched: true")
                                  .replace("  - efficientnet_b0", "  - {backbone: efficientnet_b0, settings: "
                                           "{epochs: 3, freeze_epochs: 1}}")], ids=["matched", "unmatched"])
def test_dump_round_trips(tmp_path, text):
    spec = load(write(tmp_path, text))
    dumped = specs.dump(spec)
    again = specs.validate_text(dumped, "study/spec.yaml")
    assert again.hash == spec.hash and again.raw == spec.raw
    (tmp_path / "resolved.yaml").write_text(dumped)
    assert specs.validate_text((tmp_path / "resolved.yaml").read_text(), "resolved.yaml").hash == spec.hash
    # the dump of the re-validated spec is the same text: resuming never drifts
    assert specs.dump(again) == dumped


def test_tampered_dump_is_rejected(valid_path):
    spec = load(valid_path)
    dumped = specs.dump(spec)
    assert f"spec_hash: {spec.hash}" in dumped
    tampered = dumped.replace("max_epochs: 6", "max_epochs: 7")
    assert tampered != dumped
    with pytest.raises(SpecError) as info:
        specs.validate_text(tampered, "/studies/x/spec.yaml")
    msg = str(info.value)
    assert "/studies/x/spec.yaml" in msg and "spec_hash" in msg and spec.hash in msg


def test_dump_errors_name_the_file():
    with pytest.raises(SpecError, match=r"^/studies/x/spec\.yaml: .*budget\.max_epochs"):
        dumped = specs.dump(load_text(VALID)).replace("max_epochs: 6", "max_epochs: 0")
        unhashed = "\n".join(line for line in dumped.splitlines() if not line.startswith("spec_hash:"))
        specs.validate_text(unhashed, "/studies/x/spec.yaml")


def load_text(text: str) -> specs.Spec:
    return specs.validate(specs.yaml_load(text), "inline.yaml")


# ----------------------------------------------------------------------------- unmatched specs

UNMATCHED = """
name: replication
unmatched: true
data: {source: synthetic}
arms:
  - {name: short, backbone: resnet18, settings: {epochs: 3, lr: 0.01, optimizer: sgd}}
  - {name: long, backbone: densenet121, settings: {epochs: 6, warmup_epochs: 1}}
  - {name: plain, backbone: efficientnet_b0}
budget: {samples_per_arm: 1, max_epochs: 8}
final: {seeds: [0, 1, 2], epochs: 10}
"""


def test_unmatched_arms_carry_their_own_settings(tmp_path):
    spec = load(write(tmp_path, UNMATCHED))
    assert spec.unmatched is True
    assert spec.arm("short").settings == {"epochs": 3, "lr": 0.01, "optimizer": "sgd"}
    assert [spec.epochs_for(a) for a in spec.arm_names] == [3, 6, 8]
    # final training of an unmatched study keeps each arm's own epochs, not final.epochs
    assert [spec.final_epochs_for(a) for a in spec.arm_names] == [3, 6, 8]
    short = trial_config(spec, "short", {}, seed=1)
    assert (short.epochs, short.lr, short.optimizer, short.seed) == (3, 0.01, "sgd", 1)
    long = trial_config(spec, "long", {}, seed=1)
    assert (long.epochs, long.lr, long.optimizer, long.warmup_epochs) == (6, 1e-3, "adamw", 1)
    plans = study.final_plans(spec, {a: {"config_id": 0, "params": {}} for a in spec.arm_names})
    assert {(p["arm"], p["train"]["epochs"]) for p in plans.values()} == {("short", 3), ("long", 6), ("plain", 8)}


@pytest.mark.parametrize("settings, patterns", [
    ({"seed": 3}, [r"arms\[0\]\.settings\.seed\b"]),
    ({"backbone": "resnet50"}, [r"arms\[0\]\.settings\.backbone\b"]),
    ({"learning_rate": 0.1}, [r"arms\[0\]\.settings\.learning_rate\b"]),
    ({"epochs": "3"}, [r"arms\[0\]\.settings\.epochs\b"]),
    ({"epochs": 0}, [r"\bepochs\b"]),
    # PerArmASHA stops every search trial at budget.max_epochs: more would be cut silently
    ({"epochs": 9}, [r"arms\[0\]\.settings\.epochs\b", r"budget\.max_epochs"]),
    ([1, 2], [r"arms\[0\]\.settings\b"]),
], ids=["seed", "backbone", "unknown", "epochs-type", "epochs-0", "epochs-over-budget", "not-a-mapping"])
def test_unmatched_settings_are_validated(tmp_path, settings, patterns):
    raw = specs.yaml_load(UNMATCHED)
    raw["arms"][0]["settings"] = settings
    expect_error(write(tmp_path, raw), *patterns)


# ----------------------------------------------------------------------------- paired configurations

def test_sample_configs_are_deterministic_per_seed(valid_path, tmp_path):
    spec = load(valid_path)
    first = sample_configs(spec)
    assert len(first) == 12
    assert sample_configs(load(valid_path)) == first
    other = load(write(tmp_path, VALID.replace("seed: 3", "seed: 4"), "other.yaml"))
    assert sample_configs(other) != first
    assert sample_configs(spec, 5) == first[:5]


def test_sampled_values_lie_in_the_declared_ranges(valid_path):
    configs = sample_configs(load(valid_path), 300)
    assert all(set(c) == {"lr", "dropout", "optimizer", "hidden"} for c in configs)
    lrs = [c["lr"] for c in configs]
    assert all(isinstance(v, float) and 1e-4 <= v <= 1e-1 for v in lrs)
    # log-uniform, not uniform: a third of the draws per decade (uniform would put ~90% in the top decade)
    below = sum(v < 1e-2 for v in lrs) / len(lrs)
    assert 0.55 < below < 0.8
    assert all(isinstance(c["dropout"], float) and 0.1 <= c["dropout"] <= 0.6 for c in configs)
    assert {c["optimizer"] for c in configs} == {"adam", "adamw", "sgd"}
    hidden = [c["hidden"] for c in configs]
    assert all(type(v) is int for v in hidden)  # plain ints, not numpy: JSON/CSV/TrainConfig-safe
    assert set(hidden) == {8, 9, 10}  # randint includes both ends
    assert len({c["lr"] for c in configs}) == len(configs)


def test_every_arm_gets_the_same_configurations(valid_path):
    spec = load(valid_path)
    configs = sample_configs(spec, 6)
    plans = study.search_plans(spec, configs)
    assert len(plans) == len(configs) * len(spec.arm_names)
    for cid, sample in enumerate(configs):
        mine = [p for p in plans.values() if p["config_id"] == cid]
        assert sorted(p["arm"] for p in mine) == sorted(spec.arm_names)
        for p in mine:
            assert p["params"] == sample and p["seed"] == spec.seed
            train = p["train"]
            assert {k: train[k] for k in sample} == sample
            assert train["seed"] == spec.seed and train["epochs"] == 6 and train["image_size"] == 32
            assert train["batch_size"] == 32 and train["weight_decay"] == 1e-4
        shared = [{k: v for k, v in p["train"].items() if k not in ("backbone", "pretrained", "arm")} for p in mine]
        assert all(s == shared[0] for s in shared)


def test_trial_configs_of_two_arms_differ_only_in_identity(valid_path):
    spec = load(valid_path)
    sample = sample_configs(spec, 1)[0]
    a = dataclasses.asdict(trial_config(spec, "resnet18", sample, seed=7))
    b = dataclasses.asdict(trial_config(spec, "dn121-local", sample, seed=7))
    assert {k for k in a if a[k] != b[k]} == {"backbone", "pretrained", "arm"}
    c = dataclasses.asdict(trial_config(spec, "efficientnet_b0", sample, seed=7))
    assert {k for k in a if a[k] != c[k]} == {"backbone", "arm"}


def test_final_plans_give_every_arm_every_seed_and_the_same_epochs(valid_path):
    spec = load(valid_path)
    configs = sample_configs(spec, 3)
    best = {arm: {"config_id": i, "params": configs[i]} for i, arm in enumerate(spec.arm_names)}
    plans = study.final_plans(spec, best)
    assert len(plans) == len(spec.arm_names) * 2
    for seed in (0, 1):
        for i, arm in enumerate(spec.arm_names):
            p = plans[f"{arm}/best/{seed}"]
            assert p["train"]["seed"] == seed and p["train"]["epochs"] == 8 and p["train"]["evaluate_test"]
            assert {k: p["train"][k] for k in configs[i]} == configs[i]


# ----------------------------------------------------------------------------- shipped specs

SHIPPED = sorted(STUDIES.glob("*.yaml"))


def test_the_specs_the_readme_names_are_shipped():
    assert {p.name for p in SHIPPED} >= {"quickstart.yaml", "pneumoniamnist.yaml", "kaggle_cpu.yaml",
                                         "kaggle_backbones.yaml", "seed_replication.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_spec_loads(path):
    spec = load(path)
    assert spec.arm_names
    assert specs.validate_text(specs.dump(spec), str(path)).hash == spec.hash
    configs = sample_configs(spec)
    assert len(configs) == spec.budget.samples_per_arm
    study.search_plans(spec, configs)  # every trial of the search has a valid TrainConfig


def test_make_demo_writes_the_external_site_the_quickstart_reads_before_running_it():
    """The quickstart's external set is a manifest of files on disk: `make demo` must make that very table."""
    makefile = (STUDIES.parent / "Makefile").read_text()
    site = re.search(r"^SITE := (\S+)$", makefile, re.M).group(1)
    assert re.search(r"^\$\(SITE\)/manifest.csv:.*\n\t\$\(BIN\)/cxr-ray data synthetic \$\(SITE\) ", makefile, re.M)
    assert re.search(r"^demo: .*\$\(SITE\)/manifest.csv", makefile, re.M)
    quickstart = load(STUDIES / "quickstart.yaml")
    assert [(e.source, e.path) for e in quickstart.external] == [("manifest", f"{site}/manifest.csv")]
    assert "site" in quickstart.subgroups


def test_a_study_keeps_its_hash_when_new_defaults_appear(tmp_path):
    """A spec.yaml written before a default key existed still loads, with its original identity."""
    spec = load_text(VALID)
    old = dict(spec.raw, resources={k: v for k, v in spec.raw["resources"].items() if k != "worker_resources"})
    text = yaml.safe_dump({**old, "spec_hash": specs._digest(old)}, sort_keys=False)
    loaded = specs.validate_text(text, "old/spec.yaml")
    assert loaded.hash == specs._digest(old) and loaded.raw["resources"]["worker_resources"] == {}
