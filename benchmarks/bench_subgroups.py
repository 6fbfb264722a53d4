"""Subgroup scoring speed against the set's own scoring, in the same process.

For a set of N images (patients of 1-3 images) scored by 3 arms x 3 seeds with 1000 patient
resamples, and the metadata columns sex, view, age_band (4 bands) and site: the wall time of
evaluation.score (the set's per-run, per-arm and paired tables: the baseline) and of
subgroups.score (every subgroup of every column, per arm with CIs, and the paired comparison per
subgroup), and their ratio. Figures only: nothing here asserts on time.

    .venv/bin/python benchmarks/bench_subgroups.py [--images 624 5000]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from machine import machine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cxr_ray import evaluation, spec as specs, subgroups  # noqa: E402

ARMS = ["resnet18", "densenet121", "efficientnet_b0"]


def make_set(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(n), rng.integers(1, 4, n))[:n]
    per_patient = rng.random(patients.max() + 1)
    index = pd.DataFrame({"label": (per_patient[patients] < 0.62).astype(int), "patient": patients.astype(str),
                          "sex": np.where(per_patient[patients] * 7 % 1 < 0.5, "F", "M"),
                          "age": (18 + per_patient[patients] * 1000 % 73).astype(int),
                          "view": np.where(rng.random(n) < 0.35, "AP", "PA"), "site": "site-a"})
    y = index["label"].to_numpy()
    runs, probs = {}, {}
    for a, arm in enumerate(ARMS):
        for s in range(3):
            runs[(arm, s)] = evaluation.Run(arm, s, [f"{arm}-{s}"], 0.9, np.zeros(0), np.zeros(0), 0.5, None)
            probs[(arm, s)] = 1 / (1 + np.exp(-((1 + 0.3 * a) * (2 * y - 1) + rng.normal(0, 1, n))))
    return index, runs, probs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, nargs="+", default=[624, 5000])
    args = ap.parse_args()
    raw = {"name": "bench", "data": {"source": "synthetic"}, "arms": ARMS, "search_space": {"lr": {"choice": [1e-3]}},
           "budget": {"samples_per_arm": 1, "max_epochs": 1},
           "final": {"seeds": [0, 1, 2], "bootstrap": 1000}, "subgroups": ["sex", "view", "age_band", "site"]}
    spec = specs.validate(raw, "bench.yaml")
    print(machine())
    print(f"{'images':>7} {'subgroups':>9} {'set tables s':>13} {'subgroups s':>12} {'ratio':>6}")
    for n in args.images:
        index, runs, probs = make_set(n)
        start = time.perf_counter()
        counts = evaluation.metrics.resample_counts(index["patient"].to_numpy(), 1000, spec.seed)
        tables = evaluation.score(spec, index["label"].to_numpy(), counts, runs, probs)
        base = time.perf_counter() - start
        start = time.perf_counter()
        table, _ = subgroups.score(spec, "test", index, runs, probs, tables["comparison"])
        mine = time.perf_counter() - start
        levels = table.drop_duplicates(["column", "level"])
        print(f"{n:>7} {len(levels) - 1:>9} {base:>13.2f} {mine:>12.2f} {mine / base:>6.2f}")


if __name__ == "__main__":
    main()
