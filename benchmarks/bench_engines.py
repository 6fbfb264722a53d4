"""Per-trial overhead of the two trial engines, on the same trials, same machine, same code path.

Runs one study's search phase (6 short single-worker trials, 2 at a time, no early stopping) three
times, each in a fresh process with a fresh local Ray instance:
  tune                  engine tune: the training loop inside the Tune trial, actors reused
  train                 engine train: one Ray Train run per trial, with cxr-ray's Train settings
                        (runtime.RAY_ENVIRONMENT: controller polling 0.5 s, no preemption watcher)
  train, Ray defaults   engine train with Ray's own defaults for those settings (the "before")
and prints, per variant, the per-trial overhead (trial wall time minus time in the training loop,
from trial_summary's columns), the phase's wall time and its efficiency (time in training loops /
(wall x concurrent trials)). Figures only: nothing here asserts on time.

    .venv/bin/python benchmarks/bench_engines.py [--trials 6] [--epochs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from machine import machine

VARIANTS = {
    "tune": ("tune", {}),
    "train": ("train", {}),
    "train, Ray defaults": ("train", {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
                                      "RAY_TRAIN_ENABLE_STATE_TRACKING": "0"}),
}


def spec_raw(engine: str, trials: int, epochs: int) -> dict:
    return {"name": f"bench_{engine}", "seed": 0,
            "data": {"source": "synthetic", "image_size": 32, "synthetic_images": 600},
            "arms": ["lcnet_050"], "search_space": {"lr": {"loguniform": [1e-3, 1e-2]}},
            "fixed": {"batch_size": 32},
            "budget": {"samples_per_arm": trials, "max_epochs": epochs, "grace_period": epochs},
            "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2,
                          "engine": engine}}


def run_variant(engine: str, trials: int, epochs: int, root: str) -> dict:
    """In this (fresh) process: the search phase of the spec; its trial summary as figures."""
    from cxr_ray import runtime, spec as specs, study
    spec = specs.validate(spec_raw(engine, trials, epochs), "bench_engines")
    sdir = os.path.join(root, spec.name)
    prepared = study.prepare_data(spec, sdir, progress=False)
    runtime.connect(quiet=True, log_file=os.path.join(sdir, "driver.log"))
    plans = study.search_plans(spec, specs.sample_configs(spec))
    ref = runtime.put_data(prepared)
    start = time.perf_counter()
    results = study.phase_tuner(spec, sdir, study.SEARCH, plans, ref).fit()
    wall = time.perf_counter() - start
    summary = study.trial_summary(study.collect_trials(results, sdir, study.SEARCH, plans), spec, {})
    return {"wall": wall, "overhead": summary["overhead_s"].tolist(), "in_loop": float(summary["in_loop_s"].sum()),
            "errors": len(results.errors), "trials": len(summary)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args()
    if args.variant:
        with tempfile.TemporaryDirectory() as root:
            print("RESULT " + json.dumps(run_variant(args.variant, args.trials, args.epochs, root)), flush=True)
        return 0

    print(f"bench_engines: {args.trials} single-worker trials x {args.epochs} epochs (lcnet_050, 32 px, 600 "
          f"synthetic images), 2 at a time; {machine()}", flush=True)
    rows = {}
    for name, (engine, env) in VARIANTS.items():
        with tempfile.TemporaryDirectory() as cache:
            proc = subprocess.run([sys.executable, __file__, "--variant", engine, "--trials", str(args.trials),
                                   "--epochs", str(args.epochs)], capture_output=True, text=True,
                                  env=os.environ | env | {"CXR_RAY_CACHE": cache})
        found = [ln[7:] for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not found:
            print(f"bench_engines: variant {name!r} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}",
                  file=sys.stderr)
            return 1
        rows[name] = r = json.loads(found[-1])
        if r["errors"] or r["trials"] != args.trials:
            print(f"bench_engines: variant {name!r} ran {r['trials']} trials with {r['errors']} errors",
                  file=sys.stderr)
            return 1
        print(f"  {name:<20} per-trial overhead median {statistics.median(r['overhead']):6.2f} s "
              f"(min {min(r['overhead']):.2f}, max {max(r['overhead']):.2f}); phase wall {r['wall']:6.1f} s; "
              f"efficiency {r['in_loop'] / (r['wall'] * 2):.2f}; {machine()}", flush=True)
    base, ours = (statistics.median(rows[k]["overhead"]) for k in ("train, Ray defaults", "train"))
    tune = statistics.median(rows["tune"]["overhead"])
    print(f"\nengine train, cxr-ray settings vs Ray defaults: per-trial overhead {ours:.2f} s vs {base:.2f} s "
          f"({base - ours:+.2f} s)")
    print(f"engine tune vs engine train: per-trial overhead {tune:.2f} s vs {ours:.2f} s "
          f"(wall {rows['tune']['wall']:.1f} s vs {rows['train']['wall']:.1f} s for the same trials)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
