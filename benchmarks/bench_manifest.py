"""Preparing a large manifest: listing and checking speed, decode rate per core, and memory.

Writes N small generated PNG films (default 100,000, 64 px, unique bytes each, 1-4 per fake
patient) in NORMAL/ and PNEUMONIA/ folders and a manifest listing them with metadata (site, sex,
age, view) and a pre-assigned test split, then, in this process and on the same files:

  manifest   data.prepare("manifest", ...) as `cxr-ray data prepare` runs it: read and check the
             table (every file's existence), decode into the memory-mapped cache, split, report
  baseline   data.list_source("kaggle", folder) + build_cache: the folder source over the same
             images, the decode path bench_decode.py measures on real JPEGs

and the same manifest preparation at N/4 images, to show whether memory grows with the count.
Memory is sampled every 50 ms over this process and its decoder pool: anonymous memory (heap:
listing, tables, results in flight; what the cache array does not account for) and total RSS
(which also counts the memory-mapped cache pages written so far). Figures only: nothing here
asserts on time or memory.

    .venv/bin/python benchmarks/bench_manifest.py [--images 100000] [--size 64] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import shutil
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
    p.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
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
    """N PNG files and manifest.csv under ``root``; returns the manifest's path."""
    from cxr_ray import synthetic
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
    """This process and every descendant (the decoder pool)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
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
            self._stop.wait(0.05)

    def __enter__(self):
        self.before_anon = _kib(os.getpid(), "RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- measurements

def prepare_manifest(path: Path, size: int, cache: Path, workers: int | None) -> dict:
    from cxr_ray import data
    t0 = time.perf_counter()
    source = data.list_source("manifest", str(path))
    t_list = time.perf_counter() - t0
    with Sampler() as mem:
        t1 = time.perf_counter()
        cached = data.build_cache(source, size, cache, workers=workers, progress=False)
        t_decode = time.perf_counter() - t1
        split = data.make_split(cached.index, binding=data.SPLITS)
        report = data.data_report(source, cached, None, split)
        t_all = time.perf_counter() - t0
    assert cached.images.shape == (len(source.items), size, size) and report["images"] == len(source.items)
    return {"rows": len(source.items), "list_s": t_list, "decode_s": t_decode, "total_s": t_all,
            "array_mib": cached.images.nbytes / 2**20, "anon_mib": (mem.peak_anon - mem.before_anon) / 1024,
            "rss_mib": mem.peak_rss / 1024}


def baseline_folder(root: Path, size: int, cache: Path, workers: int | None) -> dict:
    from cxr_ray import data
    t0 = time.perf_counter()
    source = data.list_source("kaggle", str(root))
    t_list = time.perf_counter() - t0
    t1 = time.perf_counter()
    data.build_cache(source, size, cache, workers=workers, progress=False)
    return {"rows": len(source.items), "list_s": t_list, "decode_s": time.perf_counter() - t1,
            "total_s": time.perf_counter() - t0}


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

        runs = {"manifest, N/4": prepare_manifest(small, args.size, work / "cache", args.workers),
                "manifest, N": prepare_manifest(big, args.size, work / "cache", args.workers),
                "folder source, N (baseline)": baseline_folder(work / "big", args.size, work / "cache-baseline",
                                                              args.workers)}
        print()
        for name, r in runs.items():
            line = (f"{name:<28} {r['rows']:>7} rows  list+check {r['list_s']:6.1f} s ({r['rows'] / r['list_s']:8.0f} "
                    f"rows/s)  decode {r['decode_s']:6.1f} s ({r['rows'] / r['decode_s']:6.0f} images/s, "
                    f"{r['rows'] / r['decode_s'] / workers:5.0f} per core)  total {r['total_s']:6.1f} s")
            if "anon_mib" in r:
                line += (f"\n{'':<28} cache array {r['array_mib']:7.0f} MiB; peak beyond it (anonymous memory of "
                         f"the process and its pool) {r['anon_mib']:6.0f} MiB; peak RSS {r['rss_mib']:6.0f} MiB")
            print(line)
        m, s, b = runs["manifest, N"], runs["manifest, N/4"], runs["folder source, N (baseline)"]
        print(f"\nratio manifest / folder source, decode images/s: {b['decode_s'] / m['decode_s']:.2f}x; "
              f"whole preparation: {b['total_s'] / m['total_s']:.2f}x (the manifest also checks, splits and reports)")
        print(f"memory beyond the array, N vs N/4: {m['anon_mib']:.0f} vs {s['anon_mib']:.0f} MiB "
              f"(x{m['anon_mib'] / max(s['anon_mib'], 1):.2f} for x{m['rows'] / s['rows']:.0f} the images; "
              f"target < 2048 MiB)")
        print(f"at end: {machine()}  (other work on the machine lowers every figure; compare rows of one run)")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
