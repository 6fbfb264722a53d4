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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .config import ENGINES, SELECTION_METRICS, ConfigError, TrainConfig
from .data import RESERVED_COLUMNS, SOURCES, DataError, check_image_size
from .manifest import PATIENT_IS_IMAGE, ROLES, ManifestFormat, label_text
from .metrics import POLICIES
from .errors import CxrError
from .synthetic import SyntheticError, SyntheticSet

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")
# Settings the study owns: a search space or fixed block may not set them.
STUDY_OWNED = {"backbone", "pretrained", "image_size", "seed", "epochs", "evaluate_test", "study", "arm",
               "spec_hash", "extra", "threads"}


# ----------------------------------------------------------------------------- the sections
# Each section is a dataclass: its fields are the keys a spec may give, their annotations the YAML
# types accepted (float also takes an int), a field without a default is required.

class LabelledSet:
    """What the study's data and an external set share: how a manifest source is read (its
    ``columns``, ``positive``/``negative`` label values and ``root``: see cxr_ray.manifest)."""

    @property
    def manifest_format(self) -> ManifestFormat:
        return ManifestFormat(dict(self.columns), tuple(map(str, self.positive)), tuple(map(str, self.negative)),
                              self.root)


def _positive() -> list:
    return list(ManifestFormat().positive)


def _negative() -> list:
    return list(ManifestFormat().negative)


@dataclass(frozen=True)
class DataSection(LabelledSet):
    source: str
    path: str | None = None
    image_size: int = 64
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    use_official_test: bool = True  # a manifest: keep its pre-assigned splits (false: carve every split)
    synthetic_images: int = 1200
    strict: bool = False
    columns: dict = field(default_factory=dict)  # manifest only, as are the next three
    positive: list = field(default_factory=_positive)
    negative: list = field(default_factory=_negative)
    root: str | None = None
    cache: str | None = None  # the decoded-image cache's root; a path every node mounts (default: local)

    @property
    def synthetic_set(self) -> SyntheticSet:
        return SyntheticSet(self.synthetic_images)


# How a manifest is read, at its defaults: left out of a spec's hash (set, they count).
MANIFEST_DEFAULTS = {"columns": {}, "positive": _positive(), "negative": _negative(), "root": None, "cache": None}


@dataclass(frozen=True)
class Budget:
    samples_per_arm: int
    max_epochs: int
    grace_period: int = 1
    reduction_factor: float = 2

    @property
    def milestones(self) -> list[int]:
        """The ASHA rungs: epochs at which trials of an arm are compared, below the maximum."""
        return rung_milestones(self.grace_period, self.max_epochs, self.reduction_factor)


@dataclass(frozen=True)
class Resources:
    workers_per_trial: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    max_concurrent_trials: int = 1
    max_failures: int = 2
    worker_resources: dict = field(default_factory=dict)
    engine: str = "auto"


@dataclass(frozen=True)
class Selection:
    metric: str = "val_auroc"
    mode: str = "max"

    @property
    def sign(self) -> int:
        """+1 when higher is better, -1 when lower is: ``sign * value`` always ranks best-highest."""
        return 1 if self.mode == "max" else -1


@dataclass(frozen=True)
class Final:
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    epochs: int | None = None
    bootstrap: int = 1000


@dataclass(frozen=True)
class Threshold:
    """How each final run picks its operating point on validation (metrics.operating_point)."""
    policy: str = "youden"
    target: float | None = None  # the sensitivity or specificity to reach, for those policies
    prevalence: float | None = None  # the served site's expected prevalence (operating.py: which policies use it)


@dataclass(frozen=True)
class External(LabelledSet):
    """A labelled set collected apart from the training data, scored once after the final phase."""
    name: str
    source: str
    path: str | None = None
    split: str | None = None  # only this source split (of a Kaggle layout, an npz or a manifest); default: all
    synthetic_images: int = 300  # synthetic source only, as are the next two
    synthetic_seed: int = 1
    synthetic_shift: float = 0.0  # another exposure and noise level than the training data (0: the same)
    columns: dict = field(default_factory=dict)  # manifest only, as are the next three
    positive: list = field(default_factory=_positive)
    negative: list = field(default_factory=_negative)
    root: str | None = None
    prevalence: float | None = None  # this set's expected prevalence (default: threshold.prevalence)

    @property
    def synthetic_set(self) -> SyntheticSet:
        return SyntheticSet(self.synthetic_images, self.synthetic_seed, self.synthetic_shift)


@dataclass(frozen=True)
class Tracking:
    """Where else the study is logged (tracking.py). Not part of the study's identity: it is neither
    hashed nor written to the study's spec.yaml (the study directory's tracking.json records it)."""
    mlflow: str | None = None  # tracking URI (an MLflow server, or a local sqlite:/// or file path)
    experiment: str | None = None  # default: $MLFLOW_EXPERIMENT_NAME, else cxr-ray


@dataclass(frozen=True)
class Arm:
    name: str
    backbone: str
    pretrained: bool | str = False
    settings: dict = field(default_factory=dict)  # only in an unmatched spec


SECTIONS = {"data": DataSection, "budget": Budget, "resources": Resources, "selection": Selection, "final": Final,
            "threshold": Threshold}
TOP_LEVEL = {"name", "description", "seed", "unmatched", "model", "arms", "search_space", "fixed",
             "external", "tracking"} | set(SECTIONS)
# Subgroup results (subgroups.py): which metadata columns, the age bands of the derived age_band column,
# and the smallest subgroup that is scored. Hashed and written to spec.yaml only when set.
SUBGROUP_DEFAULTS = {"subgroups": [], "age_bands": [0, 18, 40, 65, 120], "subgroup_min": 30}
TOP_LEVEL |= set(SUBGROUP_DEFAULTS)


def rung_milestones(grace_period: int, max_t: int, reduction_factor: float) -> list[int]:
    """Epochs at which trials are compared, below the maximum (e.g. 1, 2, 4 for max 8, rf 2)."""
    milestones, t = [], float(grace_period)
    while t < max_t:
        milestones.append(int(round(t)))
        t *= reduction_factor
    return sorted(set(milestones))


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


@dataclass
class Spec:
    """A validated study spec: typed sections, defaults filled in."""

    path: str
    name: str
    description: str
    seed: int
    unmatched: bool
    data: DataSection
    model: dict  # shared training settings (TrainConfig fields)
    arms: list[Arm]
    search_space: dict  # key -> {distribution: args}
    fixed: dict
    budget: Budget
    resources: Resources
    selection: Selection
    final: Final
    threshold: Threshold
    external: list[External]
    tracking: Tracking = field(default_factory=Tracking)
    recorded_hash: str | None = None  # a study's identity stays the hash it was started with
    subgroups: list = field(default_factory=list)  # metadata columns (or age_band) to break results down by
    age_bands: list = field(default_factory=lambda: list(SUBGROUP_DEFAULTS["age_bands"]))
    subgroup_min: int = SUBGROUP_DEFAULTS["subgroup_min"]

    @property
    def raw(self) -> dict:
        """The resolved spec as plain data, as written to the study directory and hashed."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("path", "recorded_hash", "tracking")}
        out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in out.items()}
        out["external"] = [dataclasses.asdict(e) for e in self.external]
        out["arms"] = [{k: v for k, v in dataclasses.asdict(a).items() if k != "settings" or v} for a in self.arms]
        return out

    @property
    def hash(self) -> str:
        """The digest of ``raw`` without the keys added since studies were first hashed, where they
        hold their defaults: a study that does not use them keeps the hash it always had."""
        return self.recorded_hash or _digest(_identity(self.raw))

    @property
    def arm_names(self) -> list[str]:
        return [a.name for a in self.arms]

    @property
    def engine(self) -> str:
        """How a trial runs: ``tune`` (the loop inside the Tune trial) or ``train`` (Ray Train, DDP)."""
        if self.resources.engine != "auto":
            return self.resources.engine
        return "tune" if self.resources.workers_per_trial == 1 else "train"

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def epochs_for(self, arm: str) -> int:
        return self.arm(arm).settings.get("epochs", self.budget.max_epochs)

    def final_epochs_for(self, arm: str) -> int:
        if self.unmatched:
            return self.epochs_for(arm)
        return self.final.epochs or self.budget.max_epochs


def _type_name(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join("null" if x is type(None) else x.__name__ for x in ts)


def _check_type(value, types_, where: str) -> None:
    ts = types_ if isinstance(types_, tuple) else (types_,)
    if isinstance(value, bool) and bool not in ts:
        raise SpecError(f"{where}: expected {_type_name(types_)}, got {value!r}")
    if not isinstance(value, ts):
        raise SpecError(f"{where}: expected {_type_name(types_)}, got {type(value).__name__} {value!r}")


def _accepted(hint) -> tuple:
    """The YAML value types a field annotation accepts (a float field also takes an int)."""
    parts = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    out = []
    for t in parts:
        out += [int, float] if t is float else [t]
    return tuple(out)


def _section(raw: dict, name: str, file: str, cls=None, given=None):
    """One section of the spec, checked against its dataclass: unknown keys, required keys, types."""
    cls = cls or SECTIONS[name]
    given = (raw.get(name) or {}) if given is None else given
    if not isinstance(given, dict):
        raise SpecError(f"{file}: {name}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise SpecError(f"{file}: unknown key {name}.{unknown[0]} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    for key, f in fields.items():
        if key in given:
            _check_type(given[key], _accepted(hints[key]), f"{file}: {name}.{key}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{file}: missing required key {name}.{key}")
    return cls(**given)


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
    """Check every key of a spec (as parsed from YAML) and fill in the defaults."""
    unknown = sorted(set(raw) - TOP_LEVEL)
    if unknown:
        raise SpecError(f"{file}: unknown key {unknown[0]} (known: {', '.join(sorted(TOP_LEVEL))})")
    name = raw.get("name")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise SpecError(f"{file}: name must be a word of letters, digits, - and _ (got {name!r})")
    seed, unmatched = raw.get("seed", 0), raw.get("unmatched", False)
    _check_type(seed, int, f"{file}: seed")
    _check_type(unmatched, bool, f"{file}: unmatched")
    sections = {key: _section(raw, key, file) for key in SECTIONS}

    d = sections["data"]
    _check_labelled(d, "data", file)
    try:
        check_image_size(d.image_size, f"{file}: data.image_size")
    except DataError as e:
        raise SpecError(str(e)) from None
    if d.cache and "://" in d.cache:
        raise SpecError(f"{file}: data.cache must be a filesystem path (every node of a cluster mounts it, e.g. "
                        f"NFS), got {d.cache!r}; leave it out for object storage: a cache too large to ship is then "
                        "copied to the study's storage")
    for key in ("val_fraction", "test_fraction"):
        if not 0 < getattr(d, key) < 0.5:
            raise SpecError(f"{file}: data.{key} must be in (0, 0.5) (got {getattr(d, key)})")

    b = sections["budget"]
    if b.samples_per_arm < 1:
        raise SpecError(f"{file}: budget.samples_per_arm must be >= 1 (got {b.samples_per_arm})")
    if b.max_epochs < 1:
        raise SpecError(f"{file}: budget.max_epochs must be >= 1 (got {b.max_epochs})")
    if not 1 <= b.grace_period <= b.max_epochs:
        raise SpecError(f"{file}: budget.grace_period must be in 1..max_epochs={b.max_epochs} (got {b.grace_period})")
    if b.reduction_factor <= 1:
        raise SpecError(f"{file}: budget.reduction_factor must be > 1 (got {b.reduction_factor})")

    r = sections["resources"]
    if r.workers_per_trial < 1 or r.max_concurrent_trials < 1 or r.cpus_per_worker <= 0:
        raise SpecError(f"{file}: resources: workers_per_trial, max_concurrent_trials and cpus_per_worker "
                        "must be positive")
    if r.gpus_per_worker < 0:
        raise SpecError(f"{file}: resources.gpus_per_worker must be >= 0")
    if r.engine not in ENGINES:
        raise SpecError(f"{file}: resources.engine must be one of {', '.join(ENGINES)} (got {r.engine!r})")
    if r.engine == "tune" and r.workers_per_trial > 1:
        raise SpecError(f"{file}: resources.engine tune runs a trial in one process; workers_per_trial "
                        f"{r.workers_per_trial} needs engine train (DDP) or auto")
    for key, value in r.worker_resources.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SpecError(f"{file}: resources.worker_resources.{key} must be a positive number (got {value!r})")

    sel = sections["selection"]
    if sel.metric not in SELECTION_METRICS:
        raise SpecError(f"{file}: selection.metric must be one of {', '.join(SELECTION_METRICS)}")
    if sel.mode not in ("max", "min"):
        raise SpecError(f"{file}: selection.mode must be max or min")

    t = sections["threshold"]
    if t.policy not in POLICIES:
        raise SpecError(f"{file}: threshold.policy must be one of {', '.join(POLICIES)} (got {t.policy!r})")
    if (t.policy in ("sensitivity", "specificity")) != (t.target is not None):
        raise SpecError(f"{file}: threshold.target is {'required' if t.target is None else 'only used'} with "
                        f"policy sensitivity or specificity (policy {t.policy})")
    if t.target is not None and not 0 < t.target < 1:
        raise SpecError(f"{file}: threshold.target must be in (0, 1) (got {t.target})")
    if t.prevalence is not None and not 0 < t.prevalence < 1:
        raise SpecError(f"{file}: threshold.prevalence must be in (0, 1) (got {t.prevalence})")

    f = sections["final"]
    if not f.seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in f.seeds):
        raise SpecError(f"{file}: final.seeds must be a non-empty list of integers")
    if len(set(f.seeds)) != len(f.seeds):
        raise SpecError(f"{file}: final.seeds has duplicates")
    if f.epochs is not None and f.epochs < 1:
        raise SpecError(f"{file}: final.epochs must be >= 1")

    blocks = {}
    for key in ("model", "fixed", "search_space"):
        blocks[key] = dict(raw.get(key) or {})
        if not isinstance(raw.get(key) or {}, dict):
            raise SpecError(f"{file}: {key}: expected a mapping")
    model, fixed, space = blocks["model"], blocks["fixed"], blocks["search_space"]
    _check_settings(model, "model", file, allow=("pretrained",))
    _check_settings(fixed, "fixed", file)
    _check_settings(space, "search_space", file, values=False)
    for key, dist in space.items():
        _check_distribution(key, dist, file)
    overlap = sorted((set(model) | set(fixed)) & set(space))
    if overlap:
        raise SpecError(f"{file}: search_space.{overlap[0]} is also fixed in model/fixed")
    arms = _arms(raw.get("arms"), model.pop("pretrained", False), unmatched, b.max_epochs, file)

    external = _externals(raw.get("external"), file)
    spec = Spec(file, name, str(raw.get("description", "")), seed, unmatched, d, model, arms, space, fixed, b, r, sel,
                f, t, external, _section(raw, "tracking", file, Tracking), **_subgroups(raw, file))
    # Every configuration this spec can produce must be a valid TrainConfig: all the sampled ones,
    # and every option of every choice (one the seed happens not to draw is still an error).
    samples = sample_configs(spec)
    samples += [{**samples[0], key: option} for key, dist in space.items() if "choice" in dist
                for option in dist["choice"]]
    for arm in arms:
        for sample in samples:
            try:
                trial_config(spec, arm.name, sample, seed=seed)
            except ConfigError as e:
                raise SpecError(str(e)) from None  # already names the file and the arm
    return spec


def _externals(given, file: str) -> list[External]:
    """External sets: each a named source, like ``data`` (its images are decoded at the study's size)."""
    if given is None:
        return []
    if not isinstance(given, list):
        raise SpecError(f"{file}: external must be a list of {{name, source, path}} mappings")
    out = []
    for i, entry in enumerate(given):
        ext = _section({}, f"external[{i}]", file, External, entry)
        if not re.fullmatch(r"[A-Za-z0-9_-]+", ext.name):
            raise SpecError(f"{file}: external[{i}].name must be a word of letters, digits, - and _ (got {ext.name!r})")
        if ext.name in [e.name for e in out]:
            raise SpecError(f"{file}: external[{i}]: duplicate name {ext.name!r}")
        _check_labelled(ext, f"external[{i}]", file)
        if ext.prevalence is not None and not 0 < ext.prevalence < 1:
            raise SpecError(f"{file}: external[{i}].prevalence must be in (0, 1) (got {ext.prevalence})")
        out.append(ext)
    return out


def _subgroups(raw: dict, file: str) -> dict:
    """The subgroup keys: column names (any metadata column a set records, or age_band), increasing
    age band edges, and the smallest subgroup scored. Whether a set records a column is checked on
    the data (subgroups.check_columns), before training."""
    out = {key: raw.get(key, default) for key, default in SUBGROUP_DEFAULTS.items()}
    columns, bands, smallest = out["subgroups"], out["age_bands"], out["subgroup_min"]
    if not isinstance(columns, list) or not all(isinstance(c, str) and c for c in columns):
        raise SpecError(f"{file}: subgroups must be a list of metadata column names, e.g. [sex, view, age_band, site]")
    if len(set(columns)) != len(columns):
        raise SpecError(f"{file}: subgroups has duplicates")
    reserved = [c for c in columns if c in RESERVED_COLUMNS]
    if reserved:
        raise SpecError(f"{file}: subgroups: {reserved[0]!r} is not a metadata column (reserved: "
                        f"{', '.join(RESERVED_COLUMNS)})")
    if (not isinstance(bands, list) or len(bands) < 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bands)
            or any(b >= c for b, c in zip(bands, bands[1:]))):
        raise SpecError(f"{file}: age_bands must be at least two increasing numbers, e.g. [0, 18, 40, 65, 120] "
                        f"(got {bands!r})")
    if isinstance(smallest, bool) or not isinstance(smallest, int) or smallest < 2:
        raise SpecError(f"{file}: subgroup_min must be an integer >= 2 (got {smallest!r})")
    return out


def _check_labelled(section: LabelledSet, where: str, file: str) -> None:
    """The source of a labelled set (the study's data or an external set) and its manifest keys."""
    if section.source not in SOURCES:
        raise SpecError(f"{file}: {where}.source must be one of {', '.join(SOURCES)} (got {section.source!r})")
    if section.source != "synthetic" and not section.path:
        raise SpecError(f"{file}: {where}.path is required for source {section.source!r}")
    if section.source == "synthetic":
        try:
            section.synthetic_set
        except SyntheticError as e:
            raise SpecError(f"{file}: {where}: {e}") from None
    defaults = {"columns": {}, "positive": _positive(), "negative": _negative(), "root": None}
    if section.source != "manifest":
        for key, default in defaults.items():
            if getattr(section, key) != default:
                raise SpecError(f"{file}: {where}.{key} is only read for source manifest (source is {section.source})")
        return
    for role, column in section.columns.items():
        if role not in ROLES:
            raise SpecError(f"{file}: unknown key {where}.columns.{role} (roles: {', '.join(ROLES)})")
        if not isinstance(column, str) or not column.strip():
            raise SpecError(f"{file}: {where}.columns.{role} must name a column"
                            + (f" (or be {PATIENT_IS_IMAGE!r})" if role == "patient" else "") + f", got {column!r}")
    for key in ("positive", "negative"):
        values = getattr(section, key)
        if not values or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            raise SpecError(f"{file}: {where}.{key} must be a non-empty list of label values (text or integers), "
                            f"got {values!r}")
    both = {label_text(v) for v in section.positive} & {label_text(v) for v in section.negative}
    if both:
        raise SpecError(f"{file}: {where}.positive and {where}.negative share the value(s) {', '.join(sorted(both))}")


def _arms(given, pretrained: bool | str, unmatched: bool, max_epochs: int, file: str) -> list[Arm]:
    """The arms: a backbone name or {name, backbone, pretrained}; ``settings`` only when unmatched."""
    if not isinstance(given, list) or not given:
        raise SpecError(f"{file}: arms must be a non-empty list")
    allowed = {"name", "backbone", "pretrained"} | ({"settings"} if unmatched else set())
    arms: list[Arm] = []
    for i, arm in enumerate(given):
        where = f"{file}: arms[{i}]"
        if isinstance(arm, str):
            arm = {"backbone": arm}
        if not isinstance(arm, dict) or "backbone" not in arm:
            raise SpecError(f"{where}: expected a backbone name or a mapping with 'backbone'")
        for key in arm:
            if key not in allowed:
                if key in _train_fields() or key == "settings":
                    raise SpecError(f"{where}.{key}: arms may not override {key!r}: every arm shares the search "
                                    "space, budget, split and seeds (only unmatched: true specs may)")
                raise SpecError(f"{where}: unknown key {key!r} (arms take {', '.join(sorted(allowed))})")
        _check_type(arm.get("pretrained", pretrained), (bool, str), f"{where}.pretrained")
        settings = arm.get("settings", {})
        if not isinstance(settings, dict):
            raise SpecError(f"{where}.settings: expected a mapping")
        _check_settings(settings, f"arms[{i}].settings", file, allow=("epochs",))
        if settings.get("epochs", 0) > max_epochs:
            raise SpecError(f"{where}.settings.epochs: {settings['epochs']} is more than "
                            f"budget.max_epochs={max_epochs}, where the search stops every trial")
        arms.append(Arm(arm.get("name", arm["backbone"]), arm["backbone"], arm.get("pretrained", pretrained),
                        settings))
        if arms[-1].name in [a.name for a in arms[:-1]]:
            raise SpecError(f"{where}: duplicate arm name {arms[-1].name!r}")
    return arms


def _identity(raw: dict) -> dict:
    """What a spec's hash digests: ``raw`` without the keys added since studies were first hashed
    (manifest reading, subgroups, prevalence) where they hold their defaults, so a study that does
    not use them keeps the hash it always had."""
    out = copy.deepcopy(raw)
    for key, default in SUBGROUP_DEFAULTS.items():
        if out.get(key, default) == default:
            out.pop(key, None)
    for section in [out.get("data", {}), *out.get("external", [])]:
        for key, default in MANIFEST_DEFAULTS.items():
            if key in section and section[key] == default:
                del section[key]
    for section in [out.get("threshold", {}), *out.get("external", [])]:
        if "prevalence" in section and section["prevalence"] is None:
            del section["prevalence"]
    return out


def validate_text(text: str, path: str) -> Spec:
    """The resolved spec a study wrote to its directory, checked against its recorded hash (a study
    written while the newer keys were still hashed at their defaults is accepted as well)."""
    raw = yaml_load(text)
    recorded = raw.pop("spec_hash", None)
    if recorded and recorded not in (_digest(_identity(raw)), _digest(raw)):
        raise SpecError(f"{path}: spec_hash {recorded} does not match its content ({_digest(_identity(raw))}); "
                        f"was it edited?")
    spec = validate(raw, path)  # may fill in defaults added since the study started
    spec.recorded_hash = recorded
    return spec


def sample_configs(spec: Spec, n: int | None = None) -> list[dict]:
    """The ``samples_per_arm`` hyperparameter configurations every arm is trained on."""
    return draw_configs(spec.search_space, spec.budget.samples_per_arm if n is None else n, spec.seed)


def draw_configs(space: dict, n: int, seed: int) -> list[dict]:
    """``n`` configurations drawn from a search space by a generator seeded once from ``seed``,
    so every arm sees identical values."""
    rng = np.random.default_rng([seed, 7])
    configs = []
    for _ in range(n):
        cfg = {}
        for key, dist in sorted(space.items()):
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
    values = {**spec.model, **spec.fixed, **arm.settings, **sample}
    values.update(backbone=arm.backbone, pretrained=arm.pretrained, image_size=spec.data.image_size, seed=seed,
                  epochs=epochs or spec.epochs_for(arm_name), evaluate_test=evaluate_test, study=spec.name,
                  arm=arm_name, spec_hash=spec.hash)
    return TrainConfig.from_dict(values, where=f"{spec.path}: arm {arm_name}")


def dump(spec: Spec) -> str:
    return yaml.safe_dump({**spec.raw, "spec_hash": spec.hash}, sort_keys=False)
