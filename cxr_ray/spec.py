"""Study specs: load a YAML file, validate every key, enforce fairness, sample configurations.

A spec names the compared backbones ("arms") and everything they must share: data and
split, head, ONE search space, budget, resources, selection metric and seeds. Arms may only
choose their backbone and its pretrained-weights file. The one exception is a spec marked
``unmatched: true`` (the seed-replication study), whose arms carry fixed settings of their
own; its report says so.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import yaml

from .data import SOURCES
from .errors import CxrError
from .config import ENGINES, ConfigError, TrainConfig

# The schema: section -> key -> (type(s), default). None as default means required.
SCHEMA: dict[str, dict[str, tuple]] = {
    "data": {
        "source": (str, None), "path": ((str, type(None)), None), "image_size": (int, 64),
        "val_fraction": ((int, float), 0.15), "test_fraction": ((int, float), 0.15),
        "use_official_test": (bool, True), "synthetic_images": (int, 1200), "strict": (bool, False),
    },
    "budget": {
        "samples_per_arm": (int, None), "max_epochs": (int, None), "grace_period": (int, 1),
        "reduction_factor": ((int, float), 2),
    },
    "resources": {
        "workers_per_trial": (int, 1), "cpus_per_worker": ((int, float), 1), "gpus_per_worker": ((int, float), 0),
        "max_concurrent_trials": (int, 1), "max_failures": (int, 2), "worker_resources": (dict, {}),
        "engine": (str, "auto"),
    },
    "selection": {"metric": (str, "val_auroc"), "mode": (str, "max")},
    "final": {"seeds": (list, [0, 1, 2]), "epochs": ((int, type(None)), None), "bootstrap": (int, 1000)},
}
TOP_LEVEL = {"name", "description", "seed", "unmatched", "data", "model", "arms", "search_space", "fixed",
             "budget", "resources", "selection", "final"}
ARM_KEYS = {"name", "backbone", "pretrained"}
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")
# Settings the study owns: a search space or fixed block may not set them.
STUDY_OWNED = {"backbone", "pretrained", "image_size", "seed", "epochs", "evaluate_test", "study", "arm",
               "spec_hash", "extra", "threads"}
SELECTION_METRICS = ("val_auroc", "val_accuracy_youden", "val_f1_youden", "val_loss")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-3 (no dot) as a string; search spaces are full of such numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


class SpecError(CxrError, ValueError):
    """A spec problem; the message names the file and the key."""


def _digest(raw: dict) -> str:
    return hashlib.sha1(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclasses.dataclass
class Spec:
    path: str
    raw: dict  # the resolved spec (defaults filled in), as written to the study directory
    recorded_hash: str | None = None  # a study's identity stays the hash it was started with

    def __getattr__(self, item):
        if item.startswith("__") or "raw" not in self.__dict__:
            raise AttributeError(item)
        try:
            return self.raw[item]
        except KeyError:
            raise AttributeError(item) from None

    @property
    def hash(self) -> str:
        return self.recorded_hash or _digest(self.raw)

    @property
    def arm_names(self) -> list[str]:
        return [a["name"] for a in self.raw["arms"]]

    @property
    def engine(self) -> str:
        """How a trial runs: ``tune`` (the loop inside the Tune trial) or ``train`` (Ray Train, DDP)."""
        r = self.raw["resources"]
        if r["engine"] != "auto":
            return r["engine"]
        return "tune" if r["workers_per_trial"] == 1 else "train"

    def arm(self, name: str) -> dict:
        return next(a for a in self.raw["arms"] if a["name"] == name)

    def epochs_for(self, arm: str) -> int:
        return self.arm(arm).get("settings", {}).get("epochs", self.raw["budget"]["max_epochs"])

    def final_epochs_for(self, arm: str) -> int:
        if self.raw["unmatched"]:
            return self.epochs_for(arm)
        return self.raw["final"]["epochs"] or self.raw["budget"]["max_epochs"]


def _type_name(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join("null" if x is type(None) else x.__name__ for x in ts)


def _check_type(value, types, where: str) -> None:
    ts = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in ts:
        raise SpecError(f"{where}: expected {_type_name(types)}, got {value!r}")
    if not isinstance(value, ts):
        raise SpecError(f"{where}: expected {_type_name(types)}, got {type(value).__name__} {value!r}")


def _section(raw: dict, name: str, file: str) -> dict:
    given = raw.get(name) or {}
    if not isinstance(given, dict):
        raise SpecError(f"{file}: {name}: expected a mapping")
    schema = SCHEMA[name]
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise SpecError(f"{file}: unknown key {name}.{unknown[0]} (known: {', '.join(schema)})")
    out = {}
    for key, (types, default) in schema.items():
        if key not in given:
            if default is None and not (isinstance(types, tuple) and type(None) in types):
                raise SpecError(f"{file}: missing required key {name}.{key}")
            out[key] = copy.deepcopy(default)
            continue
        _check_type(given[key], types, f"{file}: {name}.{key}")
        out[key] = given[key]
    return out


def _train_fields() -> dict[str, type]:
    return {f.name: f.type for f in dataclasses.fields(TrainConfig)}


# TrainConfig field annotations (strings) -> accepted YAML types; TrainConfig itself does not check types.
_FIELD_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "bool | str": (bool, str), "dict": dict}


def _check_settings(block: dict, where: str, file: str, allow: tuple = (), values: bool = True) -> None:
    fields = _train_fields()
    for key in block:
        if key not in fields:
            raise SpecError(f"{file}: unknown key {where}.{key} (training settings: "
                            f"{', '.join(sorted(set(fields) - STUDY_OWNED))})")
        if key in STUDY_OWNED and key not in allow:
            raise SpecError(f"{file}: {where}.{key} is set by the study itself and cannot be configured here")
        if values and fields[key] in _FIELD_TYPES:
            _check_type(block[key], _FIELD_TYPES[fields[key]], f"{file}: {where}.{key}")


def _check_distribution(key: str, dist, file: str) -> None:
    where = f"{file}: search_space.{key}"
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise SpecError(f"{where}: expected one of {{{', '.join(f'{d}: ...' for d in DISTRIBUTIONS)}}}, got {dist!r}")
    kind, args = next(iter(dist.items()))
    field_type = _train_fields()[key]
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise SpecError(f"{where}: choice needs a non-empty list")
        for i, option in enumerate(args):
            if field_type in _FIELD_TYPES:
                _check_type(option, _FIELD_TYPES[field_type], f"{where}[{i}]")
        return
    if field_type != "float" and not (kind == "randint" and field_type == "int"):
        raise SpecError(f"{where}: {kind} draws numbers but {key} is {field_type} (use choice"
                        f"{' or randint' if field_type == 'int' else ''})")
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
        raise SpecError(f"{where}: {kind} needs [low, high], got {args!r}")
    low, high = args
    if not low < high:
        raise SpecError(f"{where}: {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise SpecError(f"{where}: loguniform needs low > 0, got {args!r}")


def load(path: str | Path, data_path: str | None = None) -> Spec:
    """Read and validate a spec; every error names the file and the key.

    ``data_path`` replaces ``data.path`` (the same study on another machine's copy of the data).
    """
    file = str(path)
    try:
        raw = yaml_load(Path(path).read_text())
    except FileNotFoundError:
        raise SpecError(f"{file}: no such spec file") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{file}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{file}: expected a mapping at the top level")
    if data_path:
        raw.setdefault("data", {})["path"] = data_path
    return validate(raw, file)


def validate(raw: dict, file: str = "spec") -> Spec:
    unknown = sorted(set(raw) - TOP_LEVEL)
    if unknown:
        raise SpecError(f"{file}: unknown key {unknown[0]} (known: {', '.join(sorted(TOP_LEVEL))})")
    out: dict = {}
    name = raw.get("name")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise SpecError(f"{file}: name must be a word of letters, digits, - and _ (got {name!r})")
    out["name"] = name
    out["description"] = str(raw.get("description", ""))
    out["seed"] = raw.get("seed", 0)
    _check_type(out["seed"], int, f"{file}: seed")
    out["unmatched"] = raw.get("unmatched", False)
    _check_type(out["unmatched"], bool, f"{file}: unmatched")
    for section in SCHEMA:
        out[section] = _section(raw, section, file)

    d = out["data"]
    if d["source"] not in SOURCES:
        raise SpecError(f"{file}: data.source must be one of {', '.join(SOURCES)} (got {d['source']!r})")
    if d["source"] != "synthetic" and not d["path"]:
        raise SpecError(f"{file}: data.path is required for source {d['source']!r}")
    if not 16 <= d["image_size"] <= 1024:
        raise SpecError(f"{file}: data.image_size must be in 16..1024 (got {d['image_size']})")
    for key in ("val_fraction", "test_fraction"):
        if not 0 < d[key] < 0.5:
            raise SpecError(f"{file}: data.{key} must be in (0, 0.5) (got {d[key]})")

    b = out["budget"]
    if b["samples_per_arm"] < 1:
        raise SpecError(f"{file}: budget.samples_per_arm must be >= 1 (got {b['samples_per_arm']})")
    if b["max_epochs"] < 1:
        raise SpecError(f"{file}: budget.max_epochs must be >= 1 (got {b['max_epochs']})")
    if not 1 <= b["grace_period"] <= b["max_epochs"]:
        raise SpecError(f"{file}: budget.grace_period must be in 1..max_epochs={b['max_epochs']} "
                        f"(got {b['grace_period']})")
    if b["reduction_factor"] <= 1:
        raise SpecError(f"{file}: budget.reduction_factor must be > 1 (got {b['reduction_factor']})")

    r = out["resources"]
    if r["workers_per_trial"] < 1 or r["max_concurrent_trials"] < 1 or r["cpus_per_worker"] <= 0:
        raise SpecError(f"{file}: resources: workers_per_trial, max_concurrent_trials and cpus_per_worker "
                        "must be positive")
    if r["gpus_per_worker"] < 0:
        raise SpecError(f"{file}: resources.gpus_per_worker must be >= 0")
    if r["engine"] not in ENGINES:
        raise SpecError(f"{file}: resources.engine must be one of {', '.join(ENGINES)} (got {r['engine']!r})")
    if r["engine"] == "tune" and r["workers_per_trial"] > 1:
        raise SpecError(f"{file}: resources.engine tune runs a trial in one process; workers_per_trial "
                        f"{r['workers_per_trial']} needs engine train (DDP) or auto")
    for key, value in r["worker_resources"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SpecError(f"{file}: resources.worker_resources.{key} must be a positive number (got {value!r})")

    s = out["selection"]
    if s["metric"] not in SELECTION_METRICS:
        raise SpecError(f"{file}: selection.metric must be one of {', '.join(SELECTION_METRICS)}")
    if s["mode"] not in ("max", "min"):
        raise SpecError(f"{file}: selection.mode must be max or min")

    f = out["final"]
    if not f["seeds"] or not all(isinstance(x, int) and not isinstance(x, bool) for x in f["seeds"]):
        raise SpecError(f"{file}: final.seeds must be a non-empty list of integers")
    if len(set(f["seeds"])) != len(f["seeds"]):
        raise SpecError(f"{file}: final.seeds has duplicates")
    if f["epochs"] is not None and f["epochs"] < 1:
        raise SpecError(f"{file}: final.epochs must be >= 1")

    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise SpecError(f"{file}: model: expected a mapping")
    _check_settings(model, "model", file, allow=("pretrained",))
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise SpecError(f"{file}: fixed: expected a mapping")
    _check_settings(fixed, "fixed", file)
    space = raw.get("search_space") or {}
    if not isinstance(space, dict):
        raise SpecError(f"{file}: search_space: expected a mapping")
    _check_settings(space, "search_space", file, values=False)
    for key, dist in space.items():
        _check_distribution(key, dist, file)
    overlap = sorted((set(model) | set(fixed)) & set(space))
    if overlap:
        raise SpecError(f"{file}: search_space.{overlap[0]} is also fixed in model/fixed")
    out["model"], out["fixed"], out["search_space"] = model, fixed, space

    arms = raw.get("arms")
    if not isinstance(arms, list) or not arms:
        raise SpecError(f"{file}: arms must be a non-empty list")
    seen = set()
    resolved_arms = []
    for i, arm in enumerate(arms):
        where = f"{file}: arms[{i}]"
        if isinstance(arm, str):
            arm = {"backbone": arm}
        if not isinstance(arm, dict) or "backbone" not in arm:
            raise SpecError(f"{where}: expected a backbone name or a mapping with 'backbone'")
        allowed = ARM_KEYS | ({"settings"} if out["unmatched"] else set())
        for key in arm:
            if key not in allowed:
                if key in _train_fields() or key == "settings":
                    raise SpecError(f"{where}.{key}: arms may not override {key!r}: every arm shares the search "
                                    "space, budget, split and seeds (only unmatched: true specs may)")
                raise SpecError(f"{where}: unknown key {key!r} (arms take {', '.join(sorted(allowed))})")
        arm = {"name": arm.get("name", arm["backbone"]), "backbone": arm["backbone"],
               "pretrained": arm.get("pretrained", model.get("pretrained", False))} | (
            {"settings": arm["settings"]} if "settings" in arm else {})
        _check_type(arm["pretrained"], (bool, str), f"{where}.pretrained")
        if "settings" in arm:
            if not isinstance(arm["settings"], dict):
                raise SpecError(f"{where}.settings: expected a mapping")
            _check_settings(arm["settings"], f"arms[{i}].settings", file, allow=("epochs",))
            if arm["settings"].get("epochs", 0) > out["budget"]["max_epochs"]:
                raise SpecError(f"{where}.settings.epochs: {arm['settings']['epochs']} is more than "
                                f"budget.max_epochs={out['budget']['max_epochs']}, where the search stops every trial")
        if arm["name"] in seen:
            raise SpecError(f"{where}: duplicate arm name {arm['name']!r}")
        seen.add(arm["name"])
        resolved_arms.append(arm)
    out["arms"] = resolved_arms
    if "pretrained" in model:
        del model["pretrained"]  # carried per arm from here on

    # Every configuration this spec can produce must be a valid TrainConfig: all the sampled ones,
    # and every option of every choice (one the seed happens not to draw is still an error).
    samples = sample_configs(Spec(file, out))
    samples += [{**samples[0], key: option} for key, dist in space.items() if "choice" in dist
                for option in dist["choice"]]
    for arm in out["arms"]:
        for sample in samples:
            try:
                trial_config(Spec(file, out), arm["name"], sample, seed=out["seed"])
            except ConfigError as e:
                raise SpecError(str(e)) from None  # already names the file and the arm
    return Spec(file, out)


def load_resolved(path: str | Path) -> Spec:
    return validate_text(Path(path).read_text(), str(path))


def validate_text(text: str, path: str) -> Spec:
    """The resolved spec a study wrote to its directory, checked against its recorded hash."""
    raw = yaml_load(text)
    recorded = raw.pop("spec_hash", None)
    if recorded and recorded != _digest(raw):
        raise SpecError(f"{path}: spec_hash {recorded} does not match its content ({_digest(raw)}); was it edited?")
    spec = validate(raw, path)  # may fill in defaults added since the study started
    spec.recorded_hash = recorded
    return spec


def sample_configs(spec: Spec, n: int | None = None) -> list[dict]:
    """The ``samples_per_arm`` hyperparameter configurations every arm is trained on.

    Drawn once from a generator seeded by the spec's seed, so all arms see identical values.
    """
    n = spec.raw["budget"]["samples_per_arm"] if n is None else n
    rng = np.random.default_rng([spec.raw["seed"], 7])
    configs = []
    for _ in range(n):
        cfg = {}
        for key, dist in sorted(spec.raw["search_space"].items()):
            kind, args = next(iter(dist.items()))
            if kind == "loguniform":
                value = float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
            elif kind == "uniform":
                value = float(rng.uniform(*args))
            elif kind == "randint":
                value = int(rng.integers(args[0], args[1] + 1))
            else:
                value = args[int(rng.integers(len(args)))]
            cfg[key] = value
        configs.append(cfg)
    return configs


def trial_config(spec: Spec, arm_name: str, sample: dict, *, seed: int, evaluate_test: bool = False,
                 epochs: int | None = None) -> TrainConfig:
    """The full training configuration of one (arm, sampled configuration, seed)."""
    arm = spec.arm(arm_name)
    values = {**spec.raw["model"], **spec.raw["fixed"], **arm.get("settings", {}), **sample}
    values.update(backbone=arm["backbone"], pretrained=arm["pretrained"], image_size=spec.raw["data"]["image_size"],
                  seed=seed, epochs=epochs or spec.epochs_for(arm_name), evaluate_test=evaluate_test,
                  study=spec.raw["name"], arm=arm_name, spec_hash=spec.hash)
    return TrainConfig.from_dict(values, where=f"{spec.path}: arm {arm_name}")


def dump(spec: Spec) -> str:
    return yaml.safe_dump({**spec.raw, "spec_hash": spec.hash}, sort_keys=False)
