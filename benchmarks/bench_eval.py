"""Scoring speed: the vectorised patient bootstrap against the per-resample loop it replaced, and
the wall time of a finished study's scoring stages.

  (default)        one run's six reported metrics with 95% CIs on synthetic scores (patients of 1-3
                   images, ties), for 1000 and 2000 resamples of 300 and 3000 images, three ways on
                   the same resamples:
                     loop x6     the loop as evaluation.py ran it before: one bootstrap per metric,
                                 each resample expanded to image indices and every metric recomputed
                                 by the scalar functions (ECE with a loop over bins)
                     loop        the same loop computing each metric once per resample
                     vectorised  metrics.resample_counts + metrics.resampled + percentile_ci
                   and the largest difference between the loop's and the vectorised intervals.
  --evaluate DIR   `cxr-ray evaluate` of a copy of the finished study DIR on a 300-image synthetic
                   external set (fresh decode cache each time); with --baseline-tree OLD, the same
                   command run from the source tree OLD too, interleaved.
  --after-final DIR
                   a finished study's file times after its final phase's last epoch: when each
                   result file was written, ending with the report.
  --post-final DIR what a study driver runs after its final phase (evaluation, external sets,
                   report), on a copy of the finished study DIR; with --baseline-tree OLD, the
                   same stages of the source tree OLD too (which scores external sets afterwards),
                   and the largest difference between the two trees' result tables.

Figures only: nothing here asserts on time. The loop's code is kept here (not in the product) as
the baseline measured in the same process.

    .venv/bin/python benchmarks/bench_eval.py [--evaluate runs/quickstart [--baseline-tree /tmp/old]]
    .venv/bin/python benchmarks/bench_eval.py --after-final runs/quickstart
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from machine import machine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cxr_ray import metrics  # noqa: E402

# ----------------------------------------------------------------------------- the loop it replaced


def loop_resamples(groups, n, seed):
    """Index arrays of whole patients drawn with replacement, one generator call per resample."""
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.cumsum(np.bincount(inverse))]
    rng = np.random.default_rng(seed)
    for _ in range(n):
        picked = rng.integers(0, len(uniq), len(uniq))
        yield np.concatenate([members[starts[g]:starts[g + 1]] for g in picked])


def loop_summary(y, p, t):
    """The six metrics as the scalar functions computed them: mid-rank AUROC, counts, ECE bin by bin."""
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if not n_pos or not n_neg:
        raise metrics.MetricError("single class")
    auroc = (metrics.midranks(p)[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    pred = p >= t
    tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
    tn, fn = int((~pred & (y == 0)).sum()), int((~pred & (y == 1)).sum())
    edges = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, 9)
    ece = 0.0
    for b in range(10):
        m = which == b
        if m.any():
            ece += m.mean() * abs(float(p[m].mean()) - float(y[m].mean()))
    return {"auroc": auroc, "accuracy": (tp + tn) / len(y), "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp), "f1": 2 * tp / (2 * tp + fp + fn), "ece": ece}


def loop_values(y, p, t, groups, n, seed, only: str | None = None) -> dict[str, list]:
    values = {m: [] for m in metrics.REPORTED}
    for idx in loop_resamples(groups, n, seed):
        try:
            s = loop_summary(y[idx], p[idx], t)
        except metrics.MetricError:
            continue
        for m in ([only] if only else metrics.REPORTED):
            values[m].append(s[m])
    return values


def loop_cis_per_metric(y, p, t, groups, n, seed) -> dict:
    """Before: evaluation.py bootstrapped each metric on its own, each resample computing all six."""
    return {m: tuple(np.quantile(loop_values(y, p, t, groups, n, seed, m)[m], [0.025, 0.975]))
            for m in metrics.REPORTED}


def loop_cis(y, p, t, groups, n, seed) -> dict:
    values = loop_values(y, p, t, groups, n, seed)
    return {m: tuple(np.quantile(v, [0.025, 0.975])) for m, v in values.items()}


def vectorised_cis(y, p, t, groups, n, seed) -> dict:
    values = metrics.resampled(y, p, t, metrics.resample_counts(groups, n, seed))
    return {m: metrics.percentile_ci(v) for m, v in values.items()}


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def bench_bootstrap(sizes: list[int], resamples: list[int], skip_per_metric_above: int) -> None:
    print(f"machine: {machine()}")
    print(f"{'images':>6} {'resamples':>9} {'loop x6':>9} {'loop':>8} {'vectorised':>10} "
          f"{'vs loop x6':>10} {'vs loop':>8}  max |CI difference|")
    for n_images in sizes:
        rng = np.random.default_rng(n_images)
        groups = np.sort(rng.integers(0, int(n_images / 2), n_images))  # patients of ~2 images
        y = (rng.random(n_images) < 0.6).astype(int)
        p = np.round(1 / (1 + np.exp(-(1.2 * (2 * y - 1) + rng.normal(0, 1, n_images)))), 3).astype(np.float32)
        p = p.astype(float)
        for n in resamples:
            t_vec, vec = timed(vectorised_cis, y, p, 0.5, groups, n, 0)
            t_loop, loop = timed(loop_cis, y, p, 0.5, groups, n, 0)
            if n_images * n <= skip_per_metric_above:
                t_six, _ = timed(loop_cis_per_metric, y, p, 0.5, groups, n, 0)
                six = f"{t_six:8.2f}s"
                six_ratio = f"{t_six / t_vec:9.0f}x"
            else:
                six, six_ratio = f"{'-':>9}", f"{'-':>10}"
            worst = max(abs(a - b) for m in metrics.REPORTED for a, b in zip(vec[m], loop[m]))
            print(f"{n_images:6d} {n:9d} {six} {t_loop:7.2f}s {t_vec:9.3f}s {six_ratio} {t_loop / t_vec:7.0f}x  "
                  f"{worst:.1e}", flush=True)


# ----------------------------------------------------------------------------- a finished study


def child_cpu_seconds() -> float:
    """CPU time of the finished child processes (and theirs): on a busy machine, wall time lies more."""
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return c.ru_utime + c.ru_stime


def interleaved(what: str, measure, repeat: int, baseline_tree: str | None) -> None:
    """``measure(tree, i)`` -> (wall s, cpu s) for this tree and the baseline tree, interleaved run by
    run (background load hits both alike); the medians and the ratio."""
    print(f"machine: {machine()}")
    trees = [("this tree", str(REPO))] + ([("baseline", baseline_tree)] if baseline_tree else [])
    walls: dict[str, list[float]] = {label: [] for label, _ in trees}
    for i in range(repeat):
        for label, tree in trees:
            wall, cpu = measure(tree, i)
            walls[label].append(wall)
            print(f"  {label:<10} run {i + 1}: {wall:6.1f} s wall, {cpu:6.1f} s cpu", flush=True)
    for label, t in walls.items():
        print(f"{what}, {label}: median {statistics.median(t):.1f} s (min {min(t):.1f}, max {max(t):.1f}, "
              f"{len(t)} runs)")
    if baseline_tree:
        print(f"speed-up: {statistics.median(walls['baseline']) / statistics.median(walls['this tree']):.1f}x")


def study_copy(study: str, tmp: str, leave_out: tuple[str, ...] = ()) -> Path:
    copy = Path(tmp) / "study"
    shutil.copytree(study, copy, ignore=shutil.ignore_patterns(*leave_out))
    return copy


def evaluate_once(study: str, tree: str, i: int) -> tuple[float, float]:
    """`cxr-ray evaluate` on a copy of ``study`` with the source tree ``tree``; its cpu includes the
    command's decoder processes."""
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        copy = study_copy(study, tmp)
        env = dict(os.environ, PYTHONPATH=tree, CXR_RAY_CACHE=str(Path(tmp) / "cache"))
        env.pop("RAY_ADDRESS", None)
        cmd = [str(Path(sys.executable).parent / "cxr-ray"), "evaluate", str(copy), "--external",
               f"bench{i}=synthetic", "--source", "synthetic", "--synthetic-images", "300", "--synthetic-seed", "9",
               "--synthetic-shift", "1.0"]
        start, cpu = time.perf_counter(), child_cpu_seconds()
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"{tree}: cxr-ray evaluate failed:\n{run.stderr[-2000:]}")
        return time.perf_counter() - start, child_cpu_seconds() - cpu


POST_FINAL = """
import sys, time
from cxr_ray import evaluation, external, report, spec as specs, storage, study  # a study driver's imports
sdir = sys.argv[1]
spec = specs.validate_text(storage.read_text(storage.join(sdir, "spec.yaml")), sdir)
prepared = study.prepare_data(spec, sdir, progress=False)  # in a study, all this is done before training
audited = study.audit_external(spec, sdir, prepared) if hasattr(study, "audit_external") else None
final_trials = storage.read_csv(storage.join(sdir, "final_trials.csv"))
start, cpu = time.perf_counter(), time.process_time()
evaluation.evaluate(spec, sdir, prepared, final_trials)
for ext in spec.external:
    external.evaluate_set(spec, sdir, ext, **({"audited": audited[ext.name]} if audited else {}))
report.write(sdir)
print("POST_FINAL", time.perf_counter() - start, time.process_time() - cpu)
"""


RESULT_TABLES = ("summary", "comparison", "ensembles", "final", "operating_points")


def post_final_once(study: str, tree: str, tables: dict) -> tuple[float, float]:
    """What a study driver of ``tree`` runs after its final phase (evaluation, external sets,
    report) on a copy of ``study``: the old tree scores the external sets from checkpoints then, the
    new one reads what the final runs saved. Keeps the result tables of ``tree`` in ``tables``."""
    with tempfile.TemporaryDirectory(prefix="bench-post-final-") as tmp:
        copy = study_copy(study, tmp, ("external", "report", "driver.log"))
        env = dict(os.environ, PYTHONPATH=tree)
        env.pop("RAY_ADDRESS", None)
        run = subprocess.run([sys.executable, "-c", POST_FINAL, str(copy)], env=env, capture_output=True, text=True,
                             cwd=tree)  # python -c puts the working directory first on sys.path
        if run.returncode:
            sys.exit(f"{tree}: failed:\n{run.stderr[-3000:]}")
        tables[tree] = {str(f.relative_to(copy)): pd.read_csv(f) for name in RESULT_TABLES
                        for f in [copy / f"{name}.csv", *copy.glob(f"external/*/{name}.csv")]}
        wall, cpu = next(ln for ln in run.stdout.splitlines() if ln.startswith("POST_FINAL")).split()[1:]
        return float(wall), float(cpu)


def compare_tables(mine: dict, theirs: dict) -> None:
    """The largest difference of every number in the two trees' result tables (the same probabilities
    in, so the same statistics out)."""
    print("same numbers? largest absolute difference per table, this tree vs baseline:")
    for name in sorted(mine):
        a, b = mine[name], theirs[name]
        numeric = [c for c in a.columns if c in b and pd.api.types.is_numeric_dtype(a[c]) and len(a) == len(b)]
        diff = max((float(np.nanmax(np.abs(a[c].to_numpy(float) - b[c].to_numpy(float)), initial=0.0))
                    for c in numeric), default=float("nan"))
        other = [c for c in a.columns if c not in numeric and c in b and not a[c].equals(b[c])]
        print(f"  {name:<40} {diff:.1e}" + (f"  (differs: {', '.join(other)})" if other else ""))


def bench_after_final(study: str) -> None:
    """File times after the final phase's last epoch (final_trials.csv: finished_at of each epoch)."""
    sdir = Path(study)
    last_epoch = pd.read_csv(sdir / "final_trials.csv")["finished_at"].max()
    files = ["final_trials.csv", "predictions.csv", "summary.csv", "best.json"]
    files += sorted(str(p.relative_to(sdir)) for p in sdir.glob("external/*/verdict.json"))
    files += ["study.json", "report/index.html"]
    print(f"{sdir}: seconds after the final phase's last epoch")
    for name in files:
        if (sdir / name).exists():
            print(f"  {name:<36} {(sdir / name).stat().st_mtime - last_epoch:6.1f}")
    if (sdir / "study.json").exists():
        s = pd.read_json(sdir / "study.json", typ="series")
        phases = s.get("phases") or {}
        wall = sum(ph["wall_s"] for ph in phases.values()) if phases else float("nan")
        in_loop = sum(ph["in_loop_s"] for ph in phases.values()) if phases else float("nan")
        slots = max((ph["slots"] for ph in phases.values()), default=1)
        driver = float(s["driver_wall_s"])
        print(f"  driver wall {driver:.0f} s, search+final {wall:.0f} s; whole-study efficiency "
              f"(in training loops / (driver wall x {slots} slots)) {in_loop / (driver * slots):.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--evaluate", metavar="DIR", help="time `cxr-ray evaluate` on a copy of this finished study")
    p.add_argument("--baseline-tree", metavar="OLD", help="with --evaluate/--post-final: also run this source tree")
    p.add_argument("--repeat", type=int, default=3, help="with --evaluate/--post-final: runs per tree (default 3)")
    p.add_argument("--after-final", metavar="DIR", help="file times of a finished study after its last final epoch")
    p.add_argument("--post-final", metavar="DIR", help="time the stages after the final phase on a copy of DIR")
    p.add_argument("--sizes", type=int, nargs="+", default=[300, 3000], help="images (default 300 3000)")
    p.add_argument("--resamples", type=int, nargs="+", default=[1000, 2000], help="resamples (default 1000 2000)")
    p.add_argument("--per-metric-limit", type=int, default=300 * 2000,
                   help="run the six-bootstrap loop only up to images x resamples (default 600000: it is slow)")
    args = p.parse_args()
    if args.evaluate:
        interleaved("cxr-ray evaluate, 300-image external set", lambda tree, i: evaluate_once(args.evaluate, tree, i),
                    args.repeat, args.baseline_tree)
    elif args.after_final:
        bench_after_final(args.after_final)
    elif args.post_final:
        tables: dict = {}
        interleaved("after the final phase (evaluation, external sets, report)",
                    lambda tree, i: post_final_once(args.post_final, tree, tables), args.repeat, args.baseline_tree)
        if args.baseline_tree:
            compare_tables(tables[str(REPO)], tables[args.baseline_tree])
    else:
        bench_bootstrap(args.sizes, args.resamples, args.per_metric_limit)


if __name__ == "__main__":
    main()
