"""Everything a study wrote to its directory, read once, for the report and its figures.

Reads only through ``storage`` (so a study on s3:// reads like a local one) and never needs Ray or
torch, so it works over a finished study, a running one or one that was killed: an absent or
unreadable file reads as None, and ``why(name)`` says why in words a report can print.
"""
from __future__ import annotations

import io
import json

import pandas as pd

from . import spec as specs, storage
from .study_layout import SEARCH, spec_file

# Which stage writes each file: a missing file is explained by the stage that has not run yet.
WRITTEN_BY = {
    "data_report.json": "data preparation", "split.csv": "data preparation", "configs.csv": "data preparation",
    "asha_state.json": "the search, at every ASHA decision", "trials.csv": "the end of the search phase",
    "trial_summary.csv": "the end of the search phase", "budget.csv": "the end of the search phase",
    "best_configs.json": "the end of the search phase", "final_trials.csv": "the end of the final training phase",
    **{name: "the final evaluation" for name in ("final.csv", "summary.csv", "comparison.csv", "predictions.csv",
                                                  "best.json", "ensembles.csv", "operating_points.csv",
                                                  "validation_points.csv")},
    "study.json": "the end of the study",
    "subgroups.csv": "the final evaluation, when the spec names subgroups",
    "subgroup_comparison.csv": "the final evaluation, when the spec names subgroups",
}


class Missing(Exception):
    """A block cannot be shown because its input is absent or empty; the message says which."""


class Study:
    """The files of a study directory, each read once. An absent or unreadable file reads as None
    and ``why(name)`` says why, in words the report can print."""

    def __init__(self, sdir: str):
        self.dir = sdir
        self.problems: dict[str, str] = {}  # file -> why it reads as None
        self.unreadable: list[str] = []
        spec_uri = spec_file(sdir)
        raw = specs.yaml_load(storage.read_text(spec_uri))
        if not isinstance(raw, dict):
            raise specs.SpecError(f"{spec_uri}: expected a mapping at the top level")
        # A recorded hash that differs is reported, not refused (as resume does): the file may have been
        # written by a cxr_ray whose spec defaults differ, and its report should still be readable.
        self.recorded_hash = raw.pop("spec_hash", None)
        self.spec = specs.validate(raw, spec_uri)
        self.spec_hash = self.recorded_hash or self.spec.hash
        self.metric, self.mode = self.spec.selection.metric, self.spec.selection.mode
        self.arms = self.spec.arm_names
        self.data_report = self._json("data_report.json")
        self.split = self._csv("split.csv")
        self.configs = self._csv("configs.csv")
        self.asha = self._json("asha_state.json")
        self.trials = self._csv("trials.csv")
        self.trial_summary = self._csv("trial_summary.csv")
        self.budget = self._csv("budget.csv")
        self.best_configs = self._json("best_configs.json")
        self.final_trials = self._csv("final_trials.csv")
        self.final = self._csv("final.csv")
        self.summary = self._csv("summary.csv")
        self.comparison = self._csv("comparison.csv")
        self.predictions = self._csv("predictions.csv")
        self.best = self._json("best.json")
        self.ensembles = self._csv("ensembles.csv")
        self.operating_points = self._csv("operating_points.csv")
        self.validation_points = self._csv("validation_points.csv")
        self.study = self._json("study.json")
        self.subgroups = self._csv("subgroups.csv")
        self.subgroup_comparison = self._csv("subgroup_comparison.csv")
        self.externals = {name: External(self, name) for name in storage.listdir(storage.join(sdir, "external"))
                          if storage.exists(storage.join(sdir, "external", name, "summary.csv"))}
        if self.summary is not None and len(self.summary):
            self.summary = self.summary.sort_values("auroc", ascending=False, kind="stable")

    def _read(self, name: str, parse):
        uri = storage.join(self.dir, name)
        if not storage.exists(uri):
            self.problems[name] = f"{name} is missing (it is written by {WRITTEN_BY.get(name, 'the study')})"
            return None
        try:
            return parse(storage.read_bytes(uri))
        except (ValueError, UnicodeDecodeError) as e:  # pandas' and json's parse errors are ValueErrors
            self.problems[name] = f"{name} could not be read ({type(e).__name__}: {e})"
            self.unreadable.append(name)
            return None

    def _csv(self, name: str) -> pd.DataFrame | None:
        def parse(raw: bytes) -> pd.DataFrame:
            try:
                return pd.read_csv(io.BytesIO(raw))
            except pd.errors.EmptyDataError:  # a phase that produced no rows at all
                return pd.DataFrame()
        return self._read(name, parse)

    def _json(self, name: str):
        return self._read(name, json.loads)

    def why(self, name: str) -> str:
        return self.problems.get(name, f"{name} holds no rows yet")

    def need(self, *names: str) -> None:
        """Raise Missing naming the first of ``names`` (files, read into the attribute of the same
        stem: best.json -> self.best) that is absent or empty."""
        for name in names:
            value = getattr(self, name.split(".")[0])
            if value is None or (isinstance(value, pd.DataFrame) and value.empty):
                raise Missing(self.why(name))

    def need_table(self, table: pd.DataFrame | None, name: str) -> None:
        """Raise Missing when a table read from ``name`` is absent or empty."""
        if table is None or table.empty:
            raise Missing(self.why(name))

    @property
    def search_results(self) -> pd.DataFrame:
        """Search-phase rows that carry an epoch and the selection metric."""
        t = self.trials
        if t is None or t.empty or "epoch" not in t or self.metric not in t:
            return pd.DataFrame(columns=["trial_id", "arm", "epoch", self.metric])
        t = t[t["phase"] == SEARCH] if "phase" in t else t
        return t.dropna(subset=["epoch", self.metric])

    @property
    def parameters(self) -> dict[str, int | None]:
        """Parameter count of each arm's model, as the study recorded it (best_configs.json)."""
        return {arm: ((self.best_configs or {}).get(arm) or {}).get("parameters") for arm in self.arms}


class External:
    """The files of one external set's evaluation (external/<name>/), read through its study."""

    def __init__(self, study: Study, name: str):
        self.name = name
        read = {"csv": study._csv, "json": study._json}
        for stem, kind in (("summary", "csv"), ("comparison", "csv"), ("predictions", "csv"), ("ensembles", "csv"), ("final", "csv"),
                           ("operating_points", "csv"), ("summary_without_shared_patient_ids", "csv"),
                           ("subgroups", "csv"), ("subgroup_comparison", "csv"),
                           ("audit", "json"), ("verdict", "json")):
            setattr(self, stem, read[kind](f"external/{name}/{stem}.{kind}"))
        if self.summary is not None and len(self.summary):
            self.summary = self.summary.sort_values("auroc", ascending=False, kind="stable")
