"""The study directory's layout: what its phases, trials and files are called, in one place, so the
driver that writes a study (study.py, console.py) and everything that reads one afterwards (status,
serving, the CLI, the report) agree on every name. No Ray, no torch.

    spec.yaml                      the resolved spec: what makes a directory a study
    search/, final/                Tune's experiment of each phase: one directory per started trial,
                                   named ``<trial label>-<trial id>`` (``resnet10t-c1-s0-<id>``)
    runs/<trial id>/metrics.csv    each trial's own per-epoch record
    asha_state.json                ASHA's decisions (which trials it stopped, at which epoch)
    best.json                      written last by the final evaluation: the study is finished
"""
from __future__ import annotations

from . import spec as specs, storage
from .errors import CxrError

SEARCH, FINAL = "search", "final"


class NotAStudy(CxrError, FileNotFoundError):
    """A directory that holds no study (no spec.yaml), or a study that has not finished."""


def spec_file(study_dir: str) -> str:
    """The URI of a study's spec.yaml; NotAStudy when the directory holds none."""
    uri = storage.join(study_dir, "spec.yaml")
    if not storage.exists(uri):
        raise NotAStudy(f"{study_dir}: not a study directory (no spec.yaml)")
    return uri


def read_spec(sdir: str) -> specs.Spec:
    """The resolved spec a study wrote to its directory (checked against its recorded hash)."""
    uri = spec_file(sdir)
    return specs.validate_text(storage.read_text(uri), uri)


def finished_study(study_dir: str) -> str:
    """The study's normalised URI; NotAStudy unless it is a study whose final evaluation wrote best.json."""
    sdir = storage.normalize(study_dir)
    spec_file(sdir)
    if not storage.exists(storage.join(sdir, "best.json")):
        raise NotAStudy(f"{sdir}: no best.json; is the study finished? (cxr-ray study status {sdir})")
    return sdir


def plan_key(config: dict) -> str:
    """The key of a trial's plan (what it trains) from its Tune config: arm/configuration/seed."""
    return f"{config['arm']}/{config.get('config_id', 'best')}/{config['seed']}"


def trial_label(config: dict) -> str:
    """A trial's name from its Tune config: ``resnet10t-c1-s0`` for a search trial (arm,
    configuration, seed), ``resnet10t-s2`` for a final run (arm, seed)."""
    if "config_id" in config:
        return f"{config['arm']}-c{config['config_id']}-s{config['seed']}"
    return f"{config['arm']}-s{config['seed']}"


def trial_name(trial) -> str:
    """Tune's name and directory of a trial: ``resnet10t-c1-s0-<trial id>``."""
    return f"{trial_label(trial.config)}-{trial.trial_id}"


def trial_id_of(dirname: str) -> str:
    """The Tune trial id at the end of a trial directory's name (``resnet10t-c1-s0-<trial id>``)."""
    return dirname.rsplit("-", 1)[-1]


def history_file(sdir: str, trial_id: str) -> str:
    """A trial's own per-epoch record, written before each epoch is reported."""
    return storage.join(sdir, "runs", trial_id, "metrics.csv")


def asha_state_file(sdir: str) -> str:
    return storage.join(sdir, "asha_state.json")


def asha_stops(sdir: str) -> dict:
    """Trial id -> where ASHA stopped it ({} before the first decision)."""
    uri = asha_state_file(sdir)
    return storage.read_json(uri)["stopped"] if storage.exists(uri) else {}


def diverged(row) -> bool:
    """Whether a run's record row (an epoch of metrics.csv, a Tune result) is the epoch it diverged
    at: non-finite outputs, recorded and the run ended there (bool, or text read back from a CSV)."""
    return str(row.get("diverged", False)) == "True"
