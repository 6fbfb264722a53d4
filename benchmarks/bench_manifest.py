"""Preparing a large manifest: listing and checking speed, decode rate per core, and memory.

Writes N small generated PNG films (default 100,000, 64 px, unique bytes each, 1-4 per fake
patient) in NORMAL/ and PNEUMONIA/ folders and a manifest listing them with metadata (site, sex,
age, view) and a pre-assigned test split, then, in this process and on the same files:

  manifest   as `cxr-ray data prepare --source manifest` runs it: read and check the table (every
             file's existence), decode into the memory-mapped cache, split, report
  baseline   the same steps for the folder source over the same images (`--source kaggle`), the
             decode path bench_decode.py measures on real JPEGs

each --repeat times, interleaved (so background load hits both alike), each into a fresh cache;
then the manifest preparation at N/4 images, to show whether memory grows with the count. Memory is
sampled every 100 ms (for both variants alike) over this process and its decoder pool: anonymous memory (heap: listing, tables,
results in flight; what the cache array does not account for) and total RSS (which also counts the
memory-mapped cache pages written so far). Figures only: nothing here asserts on time or memory.
With --dir the generated images are kept there and reused by the next run.

    .venv/bin/python benchmarks/bench_manifest.py [--images 100000] [--size 64] [--repeat 2] [--dir DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from machine import machine


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--images", type=int, default=100_000, help="rows of the manifest (default 100000)")
    p.add_argument("--size", type=int, default=64, help="side of the generated images and of the cache (default 64)")
    p.add_argument("--workers", type=int, default=None, help="decoder pool size (default: all cores)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each N-image variant, interleaved (default 2)")
    p.add_argument("--dir", help="work folder, kept for the next run (default: a temporary one, removed afterwards)")
    return p.parse_args()


# ----------------------------------------------------------------------------- the data

BASES = 256  # distinct drawings; each file adds a stamp of its own index, so no two files share bytes


def _write_chunk(args) -> None:
    from PIL import Image

    from cxr_ray import synthetic
    folder, size, rows = args
    bases = {}
    for i, name, label, patient_index in rows:
        key = i % BASES
        if key not in bases:
            item = synthetic.SyntheticItem(name, "", label, patient_index, 0)
            bases[key] = synthetic.render(item, 0, size)
        pixels = bases[key].copy()
        pixels[0, :8] = np.frombuffer(int(i).to_bytes(8, "little"), np.uint8)
        Image.fromarray(pixels).save(Path(folder) / ("NORMAL", "PNEUMONIA")[label] / name, "PNG", compress_level=1)


def write_dataset(root: Path, n: int, size: int, workers: int) -> Path:
    """N PNG files and manifest.csv under ``root`` (reused when a run wrote them before); returns
    the manifest's path."""
    from cxr_ray import synthetic
    done = root / f"complete-{n}-{size}"
    if done.exists():
        return root / "manifest.csv"
    items = synthetic.listing(n, 0)
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True, exist_ok=True)
    rows = [(i, it.name, it.label, it.patient_index) for i, it in enumerate(items)]
    chunks = [(str(root), size, rows[k:k + 2000]) for k in range(0, n, 2000)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_chunk, chunks))
    patients = [it.patient for it in items]
    test = {p for p in dict.fromkeys(patients) if hash(p) % 10 == 0}
    table = pd.DataFrame({"path": [f"{('NORMAL', 'PNEUMONIA')[it.label]}/{it.name}" for it in items],
                          "label": [it.label for it in items], "patient": patients,
                          "split": ["test" if p in test else "" for p in patients], "site": "bench",
                          "sex": [it.sex for it in items], "age": [it.age for it in items],
                          "view": [it.view for it in items]})
    table.to_csv(root / "manifest.csv", index=False)
    done.touch()
    return root / "manifest.csv"


# ----------------------------------------------------------------------------- memory

def _kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _family(pid: int) -> list[int]:
    """This process and its descendants (the decoder pool), from /proc/PID/task/TID/children: a few
    small reads, not a scan of every process on the machine (which would itself eat a core)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in children.read_text().split()]
            except OSError:
                pass
    return out


class Sampler:
    """Peak anonymous memory and peak RSS (KiB, summed over the process family) while running."""

    def __init__(self):
        self.peak_anon = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            family = _family(me)
            self.peak_anon = max(self.peak_anon, sum(_kib(p, "RssAnon") for p in family))
            self.peak_rss = max(self.peak_rss, sum(_kib(p, "VmRSS") for p in family))
            self._stop.wait(0.1)

    def __enter__(self):
        self.before_anon = _kib(os.getpid(), "RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- measurements

def prepare(kind: str, path: Path, size: int, cache: Path, workers: int | None) -> dict:
    """One source prepared as data.prepare does it: listed (and checked), decoded, split, reported."""
    from cxr_ray import data
    t0 = time.perf_counter()
    source = data.list_source(kind, str(path))
    t_list = time.perf_counter() - t0
    with Sampler() as mem:
        t1 = time.perf_counter()
        cached = data.build_cache(source, size, cache, workers=workers, progress=False)
        t_decode = time.perf_counter() - t1
        split = data.make_split(cached.index, binding=data.SPLITS if kind == "manifest" else ("test",))
        report = data.data_report(source, cached, None, split)
        t_all = time.perf_counter() - t0
    assert cached.images.shape == (len(source.items), size, size) and report["images"] == len(source.items)
    return {"rows": len(source.items), "list_s": t_list, "decode_s": t_decode, "total_s": t_all,
            "array_mib": cached.images.nbytes / 2**20, "anon_mib": (mem.peak_anon - mem.before_anon) / 1024,
            "rss_mib": mem.peak_rss / 1024}


def main() -> int:
    args = parse_args()
    workers = args.workers or os.cpu_count() or 1
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_manifest_"))
    small_n = max(1, args.images // 4)
    try:
        print(f"bench_manifest: {args.images} and {small_n} images at {args.size}px, {workers} decoder process(es); "
              f"{machine()}", flush=True)
        t = time.perf_counter()
        big = write_dataset(work / "big", args.images, args.size, workers)
        small = write_dataset(work / "small", small_n, args.size, workers)
        print(f"  wrote the images and manifests in {time.perf_counter() - t:.0f} s under {work}", flush=True)
        for folder in (work / "big", work / "small"):  # warm the page cache alike for every variant
            for f in folder.rglob("*.png"):
                f.read_bytes()

        timed: dict[str, list[dict]] = {"manifest": [], "folder source (baseline)": []}
        for r in range(args.repeat):
            for name in timed:
                cache = work / f"cache-{name.split()[0]}-{r}"
                shutil.rmtree(cache, ignore_errors=True)
                timed[name].append(prepare("manifest", big, args.size, cache, args.workers) if name == "manifest"
                                   else prepare("kaggle", work / "big", args.size, cache, args.workers))
                shutil.rmtree(cache, ignore_errors=True)
                last = timed[name][-1]
                print(f"  rep {r + 1} {name}: decode {last['rows'] / last['decode_s']:.0f} images/s", flush=True)
        shutil.rmtree(work / "cache-small", ignore_errors=True)
        small_run = prepare("manifest", small, args.size, work / "cache-small", args.workers)
        shutil.rmtree(work / "cache-small", ignore_errors=True)

        def median(name, key):
            return statistics.median(r[key] for r in timed[name])

        print()
        for name, runs in timed.items():
            rows = runs[0]["rows"]
            line = (f"{name:<26} {rows:>7} rows  list+check {median(name, 'list_s'):6.1f} s "
                    f"({rows / median(name, 'list_s'):7.0f} rows/s)  decode {median(name, 'decode_s'):6.1f} s "
                    f"({rows / median(name, 'decode_s'):5.0f} images/s, {rows / median(name, 'decode_s') / workers:4.0f} "
                    f"per core)  total {median(name, 'total_s'):6.1f} s  (medians of {len(runs)})")
            print(line)
        for label, r in (("manifest, N", max(timed["manifest"], key=lambda r: r["anon_mib"])),
                         ("manifest, N/4", small_run),
                         ("folder, N", max(timed["folder source (baseline)"], key=lambda r: r["anon_mib"]))):
            print(f"{label:<14} {r['rows']:>7} rows: cache array {r['array_mib']:5.0f} MiB; peak beyond it (anonymous "
                  f"memory of the process and its pool) {r['anon_mib']:5.0f} MiB; peak RSS {r['rss_mib']:5.0f} MiB")
        m, b = "manifest", "folder source (baseline)"
        print(f"\nratio manifest / folder source, decode images/s: {median(b, 'decode_s') / median(m, 'decode_s'):.2f}x; "
              f"whole preparation (list and check, decode, split, report): "
              f"{median(b, 'total_s') / median(m, 'total_s'):.2f}x")
        big_anon = max(r["anon_mib"] for r in timed["manifest"])
        print(f"memory beyond the array, N vs N/4: {big_anon:.0f} vs {small_run['anon_mib']:.0f} MiB "
              f"(x{big_anon / max(small_run['anon_mib'], 1):.2f} for x{args.images / small_n:.0f} the images; "
              f"target < 2048 MiB)")
        print(f"at end: {machine()}  (other work on the machine lowers every figure; compare rows of one run)")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
