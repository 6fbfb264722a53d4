"""ASHA versus the full budget on the same configurations, same machine, same code path.

Runs a study's search phase twice on local Ray: once with per-arm ASHA (the spec's grace period
and reduction factor), once with ``grace_period = max_epochs`` (no rung below the maximum, so
every trial runs every epoch: FIFO). Prints the wall time of each, their ratio (target <= 0.4),
the epochs each consumed, and the best validation AUROC each found (target: within 0.01).

    .venv/bin/python benchmarks/bench_asha.py                 # built-in CPU-sized spec
    .venv/bin/python benchmarks/bench_asha.py --spec studies/quickstart.yaml
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray

from cxr_ray import runtime, spec as specs, storage, study
from machine import machine

# One arm, 9 configurations, 9 epochs, reduction factor 3: rungs at epochs 1 and 3. Epochs are
# long enough (resnet10t, 48 px, ~1000 training images) that training, not Ray's per-trial
# start-up, dominates the full-budget run.
DEFAULT = {
    "name": "bench_asha", "seed": 0,
    "data": {"source": "synthetic", "image_size": 48, "synthetic_images": 1400},
    "model": {"head": "linear"},
    "arms": ["resnet10t"],
    "search_space": {"lr": {"loguniform": [3e-4, 3e-2]}, "weight_decay": {"loguniform": [1e-5, 1e-3]}},
    "fixed": {"batch_size": 32},
    "budget": {"samples_per_arm": 9, "max_epochs": 9, "grace_period": 1, "reduction_factor": 3},
    "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
}


def search(spec: specs.Spec, root: str, data_ref, prepared) -> dict:
    sdir = os.path.join(root, spec.name)
    os.makedirs(sdir)
    storage.write_csv(os.path.join(sdir, "split.csv"), prepared.split)
    configs = specs.sample_configs(spec)
    plans = study.search_plans(spec, configs)
    start = time.perf_counter()
    results = study.phase_tuner(spec, sdir, study.SEARCH, plans, data_ref).fit()
    wall = time.perf_counter() - start
    trials = study.collect_trials(results, sdir, study.SEARCH, plans)
    summary = study.trial_summary(trials, spec, study.asha_stops(sdir))
    return {"wall": wall, "epochs": int(summary["epochs"].sum()), "trials": len(summary),
            "stopped": int(summary["outcome"].str.startswith("stopped").sum()),
            "best": float(trials["val_auroc"].max()),
            "best_final": float(summary[summary["outcome"] == "completed"]["last_val_auroc"].max()),
            "in_loop": float(summary["in_loop_s"].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", help="a study spec (default: the built-in CPU-sized one)")
    args = parser.parse_args()
    raw = specs.yaml_load(open(args.spec).read()) if args.spec else DEFAULT
    asha = specs.validate(dict(raw, name="asha"), args.spec or "built-in")
    full = specs.validate(dict(raw, name="full", budget=dict(raw["budget"], grace_period=raw["budget"]["max_epochs"])),
                          args.spec or "built-in")
    with tempfile.TemporaryDirectory() as root:
        os.environ["CXR_RAY_CACHE"] = os.environ.get("CXR_RAY_CACHE", os.path.join(root, "cache"))
        prepared = study.prepare_data(asha, os.path.join(root, "data"), progress=False)
        runtime.connect(quiet=True)
        ref = runtime.put_data(prepared)
        b = asha.budget
        print(f"bench_asha: {len(asha.arm_names)} arm(s) x {b.samples_per_arm} configurations, "
              f"max {b.max_epochs} epochs, grace {b.grace_period}, reduction factor {b.reduction_factor}, "
              f"{asha.resources.max_concurrent_trials} concurrent trials; {machine()}", flush=True)
        results = {"ASHA": search(asha, root, ref, prepared), "full budget": search(full, root, ref, prepared)}
        ray.shutdown()
    print()
    for name, r in results.items():
        print(f"{name:<12} wall {r['wall']:7.1f} s  epochs {r['epochs']:3d}  trials {r['trials']}  "
              f"stopped early {r['stopped']}  in-loop {r['in_loop']:7.1f} s  best val AUROC (any epoch) "
              f"{r['best']:.4f}  best of completed trials {r['best_final']:.4f}")
    a, f = results["ASHA"], results["full budget"]
    print(f"wall-time ratio ASHA / full budget      {a['wall'] / f['wall']:.3f}   (target <= 0.4)")
    print(f"epoch ratio ASHA / full budget          {a['epochs'] / f['epochs']:.3f}")
    print(f"best val AUROC difference (full - ASHA) {f['best_final'] - a['best_final']:+.4f}   (target within 0.01)")
    print(f"end: {machine()}")


if __name__ == "__main__":
    main()
