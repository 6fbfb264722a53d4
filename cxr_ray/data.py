"""Data sources, patient-level split and the decoded image cache.

Four sources behind one interface, ``list_source`` -> a table of items (item, label, patient,
patient_parsed, source_split, and metadata columns such as site, sex, age, view):
  manifest   a table of image paths, labels, patients and metadata (cxr_ray.manifest): any archive
  kaggle     ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg|png as downloaded
  npz        a MedMNIST file (pneumoniamnist.npz: {train,val,test}_{images,labels})
  synthetic  the built-in generator (cxr_ray.synthetic); demo data, not medical data

``build_cache`` decodes every item once (all cores, JPEG DCT downscaling) straight into a
memory-mapped uint8 .npy, so memory stays bounded whatever the image count. The cache is keyed by
the images' content and the size alone: labels and metadata come from the listing each time, so
correcting a label or adding a column to a manifest decodes nothing again. ``make_split`` carves
validation (and test, when the source has none) out of the training pool by patient, stratified
by label, with byte-identical duplicates kept on one side; pre-assigned splits are respected.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from . import imaging, metrics, storage, synthetic
from .errors import CxrError
from .synthetic import SyntheticSet

CLASSES = ("NORMAL", "PNEUMONIA")
SOURCES = ("manifest", "kaggle", "npz", "synthetic")
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png"}
CACHE_VERSION = 2  # bump when decoding or geometry changes (2: crop before resize, libjpeg-turbo)
SYNTHETIC_DEFAULT_IMAGES = 1200
MAX_IMAGE_SIZE = 1024
# Every listing's items start with the core columns; the cache adds the decoded ones; split.csv and the
# overlap audit add theirs. Any other column is metadata (site, sex, age, view, ...).
CORE_COLUMNS = ("item", "label", "patient", "patient_parsed", "source_split")
DECODED_COLUMNS = ("sha1", "width", "height")
RESERVED_COLUMNS = CORE_COLUMNS + DECODED_COLUMNS + ("split", "reason", "same_bytes", "shared_patient")

_PATIENT_PATTERNS = [
    re.compile(r"^(person\d+)_"),  # person1180_virus_2010_1.jpeg
    re.compile(r"^(NORMAL2-IM-\d+)-"),  # NORMAL2-IM-0373-0001.jpeg
    re.compile(r"^(IM-\d+)-"),  # IM-0511-0001-0002.jpeg
    re.compile(r"^(SYN-P\d+)-"),  # synthetic SYN-P00007-02.png
    re.compile(r"^(SYN-S\d+-P\d+)-"),  # synthetic of another seed: SYN-S3-P00007-02.png
]


class DataError(CxrError, ValueError):
    """Unusable data input; the message names the path, file or field."""


def check_image_size(size: int, where: str = "image size") -> None:
    """The one place the image side's bounds live (the spec and the cache both ask here)."""
    if isinstance(size, bool) or not isinstance(size, int) or not imaging.MIN_SIDE <= size <= MAX_IMAGE_SIZE:
        raise DataError(f"{where} must be in {imaging.MIN_SIDE}..{MAX_IMAGE_SIZE} (got {size})")


def metadata_columns(table: pd.DataFrame) -> list[str]:
    """The columns of an item table that describe images beyond label and patient (site, sex, age, ...)."""
    return [c for c in table.columns if c not in RESERVED_COLUMNS]


def parse_patient(filename: str) -> str | None:
    """Patient id from a Kaggle file name, or None when the name follows no known pattern."""
    name = os.path.basename(filename)
    for pattern in _PATIENT_PATTERNS:
        m = pattern.match(name)
        if m:
            return m.group(1)
    return None


# ----------------------------------------------------------------------------- sources

@dataclass
class Source:
    """A listed data source: one row per item, plus what is needed to load its pixels."""

    kind: str
    path: str  # resolved root directory, npz file or manifest; for synthetic a label ("synthetic:<seed>:<n>")
    items: pd.DataFrame  # item, label, patient, patient_parsed, source_split, metadata...
    notes: list[str]
    fingerprint: str  # changes when the images change (not when labels or metadata do)
    synthetic: SyntheticSet | None = None  # what to draw, for the synthetic source
    locations: list[str] | None = None  # each item's file (absolute path or URI), for a manifest
    image_level: bool = False  # no patient ids at all: the split can only be image-level

    def location(self, i: int) -> str:
        return self.locations[i] if self.locations is not None else os.path.join(self.path, self.items["item"].iat[i])


def _find_kaggle_root(path: Path) -> tuple[Path, list[str]]:
    """The shallowest directory under ``path`` holding ``train/{NORMAL,PNEUMONIA}``."""
    notes = []
    candidates = []
    for dirpath, dirnames, _ in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__MACOSX")))
        depth = len(Path(dirpath).relative_to(path).parts)
        if depth > 3:
            dirnames[:] = []
            continue
        if any((Path(dirpath) / "train" / c).is_dir() for c in CLASSES):
            candidates.append(Path(dirpath))
    if not candidates:
        raise DataError(
            f"{path}: no Kaggle layout found (expected train/NORMAL and train/PNEUMONIA "
            "folders within three levels, e.g. chest_xray/train/NORMAL/*.jpeg, or NORMAL/ and PNEUMONIA/ "
            "folders right here)"
        )
    candidates.sort(key=lambda p: len(p.parts))
    if len(candidates) > 1:
        notes.append(
            f"several copies of the layout found; using {candidates[0]} and ignoring "
            + ", ".join(str(c) for c in candidates[1:])
        )
    return candidates[0], notes


def list_kaggle(path: str) -> Source:
    """The Kaggle download (``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}``, nested or not), or a plain
    folder holding ``NORMAL/`` and ``PNEUMONIA/`` (no official splits: every image is in the pool)."""
    flat = Path(path)
    if any((flat / c).is_dir() for c in CLASSES) and not any((flat / "train" / c).is_dir() for c in CLASSES):
        root, notes, folders = flat, ["a folder of NORMAL/PNEUMONIA images: no official splits"], {"train": ""}
    else:
        root, notes = _find_kaggle_root(flat)
        folders = {split: split for split in SPLITS}
    rows, skipped = [], 0
    for split, sub in folders.items():
        for label, cls in enumerate(CLASSES):
            folder = root / sub / cls
            if not folder.is_dir():
                continue
            for f in sorted(folder.iterdir()):
                if f.name.startswith(".") or f.suffix.lower() not in IMAGE_EXTENSIONS or not f.is_file():
                    skipped += 1
                    continue
                patient = parse_patient(f.name)
                rows.append((f"{sub}/{cls}/{f.name}".lstrip("/"), label, patient, split, f.stat().st_size,
                             f.stat().st_mtime_ns))
    if not rows:
        raise DataError(f"{root}: the Kaggle folders contain no .jpeg/.jpg/.png files")
    if skipped:
        notes.append(f"{skipped} non-image or hidden files skipped")
    df = pd.DataFrame(rows, columns=["item", "label", "patient", "source_split", "bytes", "mtime"])
    fingerprint = hashlib.sha1(pd.util.hash_pandas_object(df[["item", "bytes", "mtime"]]).values.tobytes()).hexdigest()
    return Source("kaggle", str(root), _finish(df.drop(columns=["bytes", "mtime"])), notes, fingerprint)


def _npz_arrays(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        npz = np.load(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    out = {}
    for split in SPLITS:
        ik, lk = f"{split}_images", f"{split}_labels"
        if ik not in npz.files:
            continue
        if lk not in npz.files:
            raise DataError(f"{path}: has {ik} but no {lk}")
        images, labels = npz[ik], npz[lk].reshape(-1)
        if images.ndim not in (3, 4) or len(images) != len(labels):
            raise DataError(f"{path}: {ik} has shape {images.shape}, {lk} has {len(labels)} labels")
        if not set(np.unique(labels)) <= {0, 1}:
            raise DataError(f"{path}: {lk} holds labels other than 0/1: {sorted(set(np.unique(labels)))[:5]}")
        out[split] = (images, labels.astype(int))
    if not out:
        raise DataError(f"{path}: no <split>_images arrays (keys found: {', '.join(npz.files)})")
    return out


def list_npz(path: str) -> Source:
    arrays = _npz_arrays(path)
    rows = []
    for split, (images, labels) in arrays.items():
        rows += [(f"{split}/{i}", int(y), None, split) for i, y in enumerate(labels)]
    df = pd.DataFrame(rows, columns=["item", "label", "patient", "source_split"])
    st = os.stat(path)
    fingerprint = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    notes = ["npz sources carry no patient ids: each image counts as its own patient"]
    return Source("npz", os.path.abspath(path), _finish(df), notes, fingerprint, image_level=True)


def list_synthetic(drawn: SyntheticSet = SyntheticSet()) -> Source:
    """The built-in drawings, with a manifest's metadata (sex, age, view, site); ``drawn.shift`` > 0:
    the same kind of drawings as another site would take them (see synthetic.render)."""
    items = synthetic.listing(drawn.images, drawn.seed)
    df = pd.DataFrame(
        [(it.name, it.label, it.patient, "train", drawn.site, it.sex, it.age, it.view) for it in items],
        columns=["item", "label", "patient", "source_split", "site", "sex", "age", "view"],
    )
    tag = f"{drawn.seed}-{drawn.images}" + (f"-shift{drawn.shift:g}" if drawn.shift else "")
    fingerprint = f"synthetic-v{synthetic.GENERATOR_VERSION}-{tag}"
    notes = [synthetic.NOT_MEDICAL]
    label = f"synthetic:{drawn.seed}:{drawn.images}" + (f":{drawn.shift:g}" if drawn.shift else "")
    return Source("synthetic", label, _finish(df), notes, fingerprint, synthetic=drawn)


def list_manifest(path: str, fmt=None) -> Source:
    """A manifest table (cxr_ray.manifest), checked row by row before anything is decoded."""
    from . import manifest
    listing = manifest.load(path, fmt)
    uri = path if storage.is_remote(path) else os.path.abspath(path)
    return Source("manifest", uri, _finish(listing.items), listing.notes, listing.fingerprint,
                  locations=listing.locations, image_level=listing.image_level)


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    """Core columns first, in one order; an item without a patient id is its own patient."""
    parsed = df["patient"].notna()
    df = df.assign(patient_parsed=parsed, patient=df["patient"].where(parsed, "item:" + df["item"]))
    return df[list(CORE_COLUMNS) + [c for c in df.columns if c not in CORE_COLUMNS]].reset_index(drop=True)


def list_source(kind: str, path: str | None = None, *, synthetic: SyntheticSet | None = None,
                manifest=None) -> Source:
    """List a source's items; raises DataError naming the path when it is unusable. ``synthetic``
    says what to draw (synthetic source); ``manifest`` how to read the table (a ManifestFormat)."""
    if kind not in SOURCES:
        raise DataError(f"unknown source {kind!r}: choose one of {', '.join(SOURCES)}")
    if kind == "synthetic":
        return list_synthetic(synthetic or SyntheticSet())
    if not path:
        raise DataError(f"source {kind!r} needs a path (--path)")
    path = path if storage.is_remote(path) else os.path.expanduser(path)
    if kind == "manifest":
        return list_manifest(path, manifest)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    return list_kaggle(path) if kind == "kaggle" else list_npz(path)


# ----------------------------------------------------------------------------- decoding

def _decode_file(args: tuple[str, int]) -> tuple[np.ndarray | None, str, int, int, str]:
    """Worker: file (path or URI) -> (pixels, sha1, width, height, error). Never raises."""
    location, size = args
    try:
        data = storage.read_bytes(location) if storage.is_remote(location) else Path(location).read_bytes()
    except OSError as e:
        return None, "", 0, 0, f"unreadable: {e}"
    sha1 = hashlib.sha1(data).hexdigest()
    try:
        got = imaging.to_pixels(data, size, location)  # the server's own function: one decoding policy
        return got.pixels, sha1, got.width, got.height, ""
    except imaging.ImageError as e:
        reason = str(e).removeprefix(f"{location}: ")
        return None, sha1, 0, 0, f"{reason} ({e.detail})" if e.detail else reason


def _render_synthetic(args: tuple[synthetic.SyntheticItem, int, int, float]):
    item, seed, size, shift = args
    pixels = synthetic.render(item, seed, size, shift)
    return pixels, hashlib.sha1(pixels.tobytes()).hexdigest(), size, size, ""


def _decode_npz(source: Source, size: int):
    arrays = _npz_arrays(source.path)
    for split, (images, _) in arrays.items():
        for img in images:
            if img.ndim == 3:  # RGB MedMNIST variants
                img = np.asarray(img.mean(axis=-1).round(), dtype=np.uint8)
            img = np.asarray(img, dtype=np.uint8)
            yield imaging.square(img, size), hashlib.sha1(img.tobytes()).hexdigest(), img.shape[1], img.shape[0], ""


def _progress(done: int, total: int, start: float, label: str) -> None:
    if not sys.stderr.isatty() and done not in (total,) and done % max(1, total // 10):
        return
    rate = done / max(time.perf_counter() - start, 1e-9)
    bar = "#" * int(30 * done / total)
    end = "\n" if done == total or not sys.stderr.isatty() else ""
    print(f"\r{label} [{bar:<30}] {done}/{total} ({rate:.0f} img/s)", end=end, file=sys.stderr, flush=True)


def decode_all(source: Source, size: int, workers: int | None = None, progress: bool = True):
    """Yield (pixels, sha1, width, height, error) for every item, in order, on all cores."""
    total = len(source.items)
    start = time.perf_counter()
    if source.kind == "npz":
        results = _decode_npz(source, size)
        pool = None
    else:
        workers = workers or os.cpu_count() or 1
        if source.kind == "synthetic":
            drawn = source.synthetic
            fn, args = _render_synthetic, [(it, drawn.seed, size, drawn.shift)
                                           for it in synthetic.listing(drawn.images, drawn.seed)]
        else:
            fn, args = _decode_file, [(source.location(i), size) for i in range(total)]
        pool = ProcessPoolExecutor(workers) if workers > 1 else None
        chunk = max(1, min(64, total // (workers * 8) or 1))
        results = pool.map(fn, args, chunksize=chunk) if pool else map(fn, args)
    try:
        for n, result in enumerate(results, 1):
            yield result
            if progress:
                _progress(n, total, start, f"decoding {source.kind} at {size}px")
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


# ----------------------------------------------------------------------------- cache

@dataclass
class Cache:
    """Decoded images of one source at one size: ``images[i]`` is row i of ``index``."""

    dir: Path
    images: np.ndarray  # (N, size, size) uint8, memory-mapped
    index: pd.DataFrame  # the listing's items (metadata included) + sha1, width, height

    @property
    def size(self) -> int:
        return int(self.images.shape[1])


def default_cache_root() -> Path:
    return Path(os.environ.get("CXR_RAY_CACHE", Path.home() / ".cache" / "cxr-ray"))


def cache_key(source: Source, size: int) -> str:
    return hashlib.sha1(f"v{CACHE_VERSION}:{source.kind}:{source.fingerprint}:{size}".encode()).hexdigest()[:16]


def build_cache(source: Source, size: int, cache_root: str | Path | None = None, *, strict: bool = False,
                workers: int | None = None, progress: bool = True) -> Cache:
    """Decode ``source`` at ``size`` px once; later calls with the same images reuse it.

    Pixels go straight into a memory-mapped ``images.npy`` as they are decoded, so the memory this
    takes beyond the file is bounded by the listing and the pool's batches, not by the image count.
    Corrupt files are skipped and listed in ``errors.csv`` (or raise DataError if ``strict``).
    """
    check_image_size(size)
    root = Path(cache_root or default_cache_root()).expanduser().absolute()  # workers chdir elsewhere
    directory = root / f"{source.kind}-{size}px-{cache_key(source, size)}"
    if (directory / "index.csv").exists():
        errors = pd.read_csv(directory / "errors.csv") if (directory / "errors.csv").exists() else None
        if strict and errors is not None and len(errors):
            raise DataError(_errors_message(errors))
        return load_cache(directory, source)

    n = len(source.items)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
        sha1s, widths, heights, errors = [""] * n, [0] * n, [0] * n, []
        for i, (pixels, sha1, w, h, error) in enumerate(decode_all(source, size, workers, progress)):
            sha1s[i], widths[i], heights[i] = sha1, w, h
            if error:
                errors.append((i, source.items["item"].iat[i], error))
            else:
                images[i] = pixels
        errors = pd.DataFrame(errors, columns=["row", "item", "error"])
        if strict and len(errors):
            raise DataError(_errors_message(errors))
        if len(errors) == n:
            raise DataError(f"{source.path}: no readable images:\n{_errors_message(errors.head(10))}")
        if len(errors):
            print(f"warning: {len(errors)} unreadable images skipped:\n{_errors_message(errors)}", file=sys.stderr)
            keep = np.ones(n, bool)
            keep[errors["row"].to_numpy()] = False
            images = _compact(images, keep, tmp / "images.npy")
        images.flush()
        del images
        index = pd.DataFrame({"item": source.items["item"], "sha1": sha1s, "width": widths, "height": heights})
        index.drop(errors["row"]).to_csv(tmp / "index.csv", index=False)
        errors.drop(columns="row").to_csv(tmp / "errors.csv", index=False)
        (tmp / "source.json").write_text(json.dumps({"kind": source.kind, "path": source.path, "size": size,
                                                      "notes": source.notes}, indent=1))
        try:
            tmp.rename(directory)  # atomic: a half-written cache is never picked up
        except OSError:  # another process built it meanwhile
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_cache(directory, source)


def _compact(images: np.ndarray, keep: np.ndarray, path: Path) -> np.ndarray:
    """The rows of ``images`` to keep, as a new memory-mapped file at ``path`` (copied in chunks)."""
    part = path.with_name("images.part.npy")
    out = np.lib.format.open_memmap(part, mode="w+", dtype=np.uint8, shape=(int(keep.sum()),) + images.shape[1:])
    rows = np.flatnonzero(keep)
    for start in range(0, len(rows), 4096):
        chunk = rows[start:start + 4096]
        out[start:start + len(chunk)] = images[chunk]
    out.flush()
    del images
    os.replace(part, path)
    return out


def _errors_message(errors: pd.DataFrame) -> str:
    return "\n".join(f"  {row.item}: {row.error}" for row in errors.itertuples())


def publish_images(cache: Cache, root: str) -> str:
    """Copy a cache's images to ``root`` (shared storage: an NFS path or s3://, gs://) once, for nodes
    that cannot see this one's disk; returns where they are. A copy of the same size is reused."""
    target = storage.join(storage.normalize(root), cache.dir.name, "images.npy")
    source = str(cache.dir / "images.npy")
    size = os.path.getsize(source)
    if storage.is_remote(target):
        fs, path = pafs.FileSystem.from_uri(target)
        if fs.get_file_info(path).size != size:  # streamed: never the whole file in memory
            pafs.copy_files(source, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    elif not os.path.exists(target) or os.path.getsize(target) != size:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, f"{target}.tmp{os.getpid()}")
        os.replace(f"{target}.tmp{os.getpid()}", target)
    return target


def map_images(location: str) -> np.ndarray:
    """A cache's images memory-mapped read-only: from a path this node mounts, or from object storage
    after one download per node (a lock keeps this node's workers from fetching it twice)."""
    if not storage.is_remote(location):
        return np.load(location, mmap_mode="r")
    import fcntl
    local = default_cache_root() / "mapped" / f"{hashlib.sha1(location.encode()).hexdigest()[:16]}.npy"
    local.parent.mkdir(parents=True, exist_ok=True)
    fs, path = pafs.FileSystem.from_uri(location)
    with open(f"{local}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not local.exists() or local.stat().st_size != fs.get_file_info(path).size:
            pafs.copy_files(path, f"{local}.part", source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            os.replace(f"{local}.part", local)
    return np.load(local, mmap_mode="r")


def read_cache(directory: str | Path) -> tuple[np.ndarray, pd.DataFrame]:
    """A built cache's images (memory-mapped) and what it decoded (item, sha1, width, height), row by row."""
    directory = Path(directory)
    return (np.load(directory / "images.npy", mmap_mode="r"),
            pd.read_csv(directory / "index.csv", dtype={"item": str, "sha1": str}))


def load_cache(directory: str | Path, source: Source) -> Cache:
    """A built cache whose index carries ``source``'s labels and metadata (the pixels were keyed by
    the images alone), in the listing's order, without the items that could not be decoded."""
    images, decoded = read_cache(directory)
    index = source.items.merge(decoded[["item", *DECODED_COLUMNS]], on="item", how="inner", validate="1:1")
    return Cache(Path(directory), images, index)


# ----------------------------------------------------------------------------- split

def _groups(patients: pd.Series, sha1s: pd.Series) -> np.ndarray:
    """Connected components of items linked by a shared patient or identical bytes."""
    parent = list(range(len(patients)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key in (patients, sha1s):
        first: dict[str, int] = {}
        for i, k in enumerate(key):
            if k in first:
                parent[find(i)] = find(first[k])
            else:
                first[k] = i
    return np.array([find(i) for i in range(len(patients))])


def make_split(index: pd.DataFrame, *, val_fraction: float = 0.15, test_fraction: float = 0.15,
               seed: int = 0, use_official_test: bool = True, binding: tuple[str, ...] = ("test",)) -> pd.DataFrame:
    """Assign every item to train/val/test (or ``excluded``) by patient, stratified by label.

    ``binding``: the source splits kept as given (a Kaggle layout's ``test``; a manifest's
    pre-assigned ``train``, ``val`` and ``test``); ``use_official_test=False`` keeps none. Every
    other item is in the pool (the official Kaggle ``val`` of 16 images joins it), from which the
    splits not given are carved. A pool item linked to a kept test or val split by a shared patient
    or identical bytes is excluded (reason given), as is an item of a kept split linked that way to
    a kept split of higher rank (test, then val); a pool item linked to the kept train split joins
    it. No patient and no image's bytes are ever on two sides.
    The table carries the items' metadata columns, so split.csv describes every image.
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:
            raise DataError(f"{name} must be in [0, 1), got {f}")
    df = index[["item", "label", "patient", "sha1"]].copy()
    df["split"], df["reason"] = "", ""
    group = _groups(df["patient"], df["sha1"])
    kept = [s for s in ("test", "val", "train") if use_official_test and s in binding
            and (index["source_split"] == s).any()]
    given = index["source_split"].to_numpy()
    for name in kept:
        mine = (given == name) & (df["split"] == "").to_numpy()
        df.loc[mine, "split"] = name
        linked = (df["split"] == "").to_numpy() & np.isin(group, group[mine])
        if name == "train":  # nothing ranks below train: its patients' other images may join it
            df.loc[linked, "split"] = "train"
        else:
            given_by = "official" if binding == ("test",) else "pre-assigned"
            df.loc[linked, ["split", "reason"]] = ["excluded", f"shares a patient or identical bytes with the "
                                                               f"{given_by} {name} split"]
    fractions = {s: f for s, f in (("test", test_fraction), ("val", val_fraction)) if s not in kept}
    if sum(fractions.values()) >= 1:
        raise DataError(f"val_fraction + test_fraction must be < 1, got {sum(fractions.values())}")

    rng = np.random.default_rng(seed)
    pool = df["split"] == ""
    # a group (patient or identical bytes) can hold both labels: stratify it by its highest
    # label so that it is assigned once, as a whole
    group_label = df["label"].groupby(group).transform("max")
    for label in (0, 1):
        members = pool & (group_label == label)
        gids, sizes = np.unique(group[members.to_numpy()], return_counts=True)
        order = rng.permutation(len(gids))
        total = sizes.sum()
        targets = {s: f * total for s, f in fractions.items()}
        filled = dict.fromkeys(targets, 0)
        assign = {}
        for k in order:  # greedy: each group goes to the split furthest below its target
            need = {s: targets[s] - filled[s] for s in targets}
            best = max(need, key=need.get) if need else None
            if best and need[best] >= sizes[k] / 2:
                assign[gids[k]] = best
                filled[best] += sizes[k]
            else:
                assign[gids[k]] = "train"
        idx = np.flatnonzero(members.to_numpy())
        df.loc[df.index[idx], "split"] = [assign[g] for g in group[idx]]
    check_split(df)
    for column in metadata_columns(index):
        df[column] = index[column].to_numpy()
    return df


def check_split(split: pd.DataFrame) -> None:
    """Raise DataError if any patient or identical image appears in two splits."""
    used = split[split["split"] != "excluded"]
    for key in ("patient", "sha1"):
        spread = used.groupby(key)["split"].nunique()
        bad = spread[spread > 1]
        if len(bad):
            raise DataError(f"split leak: {len(bad)} {key} value(s) in more than one split, e.g. {bad.index[0]}")


OVERLAP_POLICY = ("External images byte-identical to an image of the study (train, validation or test) are not "
                  "external: they are left out of every external score. Images whose patient id also names a "
                  "patient of the study are kept (separately collected sets reuse ids: Kaggle's test numbering "
                  "restarts its personN ids), and every external metric is also given without them.")


def audit_overlap(external: pd.DataFrame, split: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """An external set (cache index: item, patient, patient_parsed, sha1) against a study's split
    (split.csv): which external images repeat the study's bytes or patient ids, and in which split.

    Returns the external index with two flags (``same_bytes``, ``shared_patient``) and a summary."""
    used = split[split["split"].isin(SPLITS)]
    by_sha1 = used.groupby("sha1")["split"].agg(lambda x: sorted(set(x)))
    by_patient = used.groupby("patient")["split"].agg(lambda x: sorted(set(x)))
    flagged = external.assign(same_bytes=external["sha1"].isin(by_sha1.index),
                              shared_patient=external["patient_parsed"] & external["patient"].isin(by_patient.index))

    def listing(mask, key, where):
        rows = flagged[mask]
        return {"images": int(mask.sum()), "patients": int(rows["patient"].nunique()),
                "in_splits": {s: int(sum(s in where[k] for k in rows[key])) for s in SPLITS},
                "examples": rows["item"].head(10).tolist()}

    summary = {"images": len(flagged), "policy": OVERLAP_POLICY,
               "same_bytes": listing(flagged["same_bytes"], "sha1", by_sha1),
               "shared_patient_ids": listing(flagged["shared_patient"], "patient", by_patient)}
    return flagged, summary


def split_indices(split: pd.DataFrame, cache: Cache) -> dict[str, np.ndarray]:
    """Cache row numbers of each split (rows follow the cache index order)."""
    where = cache.index["item"].map(dict(zip(split["item"], split["split"])))
    return {s: np.flatnonzero((where == s).to_numpy()) for s in SPLITS}


# ----------------------------------------------------------------------------- report

def data_report(source: Source, cache: Cache | None = None, errors: pd.DataFrame | None = None,
                split: pd.DataFrame | None = None) -> dict:
    """Counts, patients, duplicates, corrupt files, sizes, leakage in the source's own splits, and
    the composition of every split (and site) by label and by each metadata column."""
    items = cache.index if cache is not None else source.items
    report: dict = {"source": source.kind, "path": source.path, "notes": source.notes, "images": len(items)}
    report["per_split_class"] = {
        s: {CLASSES[y]: int(n) for y, n in g["label"].value_counts().sort_index().items()}
        for s, g in items.groupby("source_split")
    }
    per_patient = items.groupby("patient").size()
    report["patients"] = int(items["patient"].nunique())
    report["images_per_patient"] = {"min": int(per_patient.min()), "median": float(per_patient.median()),
                                    "max": int(per_patient.max())}
    report["unparsed_names"] = int((~items["patient_parsed"]).sum()) if source.kind == "kaggle" else 0
    report["images_without_patient_id"] = int((~items["patient_parsed"]).sum())
    # image-level: no image carries a patient id, so nothing keeps a patient's images on one side
    report["split_level"] = "image" if source.image_level or not items["patient_parsed"].any() else "patient"
    if errors is not None:
        report["corrupt"] = [{"item": r.item, "error": r.error} for r in errors.itertuples()]
    if "sha1" in items:
        dup = items[items.duplicated("sha1", keep=False)]
        report["duplicates"] = {
            "groups": int(dup["sha1"].nunique()),
            "images": len(dup),
            "across_classes": int((dup.groupby("sha1")["label"].nunique() > 1).sum()),
            "examples": [list(g["item"]) for _, g in list(dup.groupby("sha1"))[:5]],
        }
        sizes = items.loc[items["width"] > 0, ["width", "height"]]
        report["original_size_px"] = {
            k: {q: int(v) for q, v in zip(("min", "p50", "max"), sizes[k].quantile([0, 0.5, 1]))} for k in sizes
        }
        shaped = items[items["width"] > 0]
        aspect = (shaped["width"] / shaped["height"]).to_numpy()
        if len(set(aspect)) > 1 and shaped["label"].nunique() == 2:
            # How well the film's shape alone tells the classes apart: a cue a model will learn
            report["aspect_ratio"] = {
                "median_by_class": {CLASSES[y]: round(float(np.median(aspect[shaped["label"] == y])), 3) for y in (0, 1)},
                "auroc": round(metrics.auroc(shaped["label"].to_numpy(), aspect), 3)}
    # leakage between the source's own splits
    leaks = {}
    for key in ("patient", "sha1"):
        if key not in items:
            continue
        spread = items[items["patient_parsed"] | (key == "sha1")].groupby(key)["source_split"].nunique()
        shared = spread[spread > 1]
        leaks[key] = {"count": len(shared), "examples": list(shared.index[:5])}
    report["leakage_in_source_splits"] = leaks
    if split is not None:
        report["split"] = {
            s: {"images": int(len(g)), "patients": int(g["patient"].nunique()),
                "pneumonia_fraction": round(float(g["label"].mean()), 4)}
            for s, g in split.groupby("split")
        }
    report["composition"] = composition(items, split)
    return report


COMPOSITION_MAX_VALUES = 12  # a text column with more distinct values (an id) is counted, not listed
SPLIT_ORDER = ("train", "val", "test", "excluded", "pool")


def composition(items: pd.DataFrame, split: pd.DataFrame | None = None) -> dict:
    """Images per split (the study's split when given, else the source's) and site, by label and by
    each metadata column: per value for a categorical column, min/median/max for a numeric one."""
    part = items["item"].map(dict(zip(split["item"], split["split"]))) if split is not None else items["source_split"]
    frame = items.assign(split=part.fillna("excluded").to_numpy())
    keys = ["split"] + (["site"] if "site" in items else [])
    columns = [c for c in metadata_columns(items) if c != "site"]
    frame[keys] = frame[keys].astype(str)
    groups = []
    for key, g in frame.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        entry = dict(zip(keys, key)) | {"classes": {CLASSES[y]: int((g["label"] == y).sum()) for y in (0, 1)},
                                        "columns": {}}
        for c in columns:
            values = g[c]
            if pd.api.types.is_numeric_dtype(values):
                known = values.dropna()
                entry["columns"][c] = {"min": float(known.min()) if len(known) else None,
                                       "median": float(known.median()) if len(known) else None,
                                       "max": float(known.max()) if len(known) else None,
                                       "missing": int(values.isna().sum())}
            elif frame[c].nunique() > COMPOSITION_MAX_VALUES:
                entry["columns"][c] = {"distinct": int(values.nunique())}
            else:
                text = values.fillna("").astype(str).replace("", "(blank)")
                entry["columns"][c] = {v: {CLASSES[y]: int(((text == v) & (g["label"] == y)).sum()) for y in (0, 1)}
                                       for v in sorted(set(text))}
        groups.append(entry)
    rank = {s: i for i, s in enumerate(SPLIT_ORDER)}
    groups.sort(key=lambda e: (rank.get(e["split"], len(rank)), e.get("site", "")))
    return {"by": keys, "groups": groups}


def format_report(report: dict) -> str:
    lines = [f"source     {report['source']}  ({report['path']})", f"images     {report['images']}"]
    for s, counts in report["per_split_class"].items():
        total = sum(counts.values())
        ratio = f"  NORMAL:PNEUMONIA = 1:{counts.get('PNEUMONIA', 0) / max(counts.get('NORMAL', 0), 1):.2f}"
        lines.append(f"  {s:<6} {total:>6}  " + "  ".join(f"{c}={n}" for c, n in counts.items()) + ratio)
    ipp = report["images_per_patient"]
    lines.append(f"patients   {report['patients']}  (images per patient: min {ipp['min']}, "
                 f"median {ipp['median']:g}, max {ipp['max']})")
    if report["source"] == "kaggle":
        lines.append(f"unparsed   {report['unparsed_names']} file names with no patient id (one patient per file)")
    elif report.get("split_level") == "image":
        lines.append("patient ids none: every image is its own patient, so the split is IMAGE-LEVEL (images of one "
                     "patient can sit on both sides of it)")
    elif report.get("images_without_patient_id"):
        lines.append(f"no id      {report['images_without_patient_id']} images without a patient id (one patient each)")
    if "duplicates" in report:
        d = report["duplicates"]
        lines.append(f"duplicates {d['groups']} groups of byte-identical images ({d['images']} images, "
                     f"{d['across_classes']} groups with conflicting labels)")
        for ex in d["examples"]:
            lines.append("             " + " == ".join(ex))
    if "corrupt" in report:
        lines.append(f"corrupt    {len(report['corrupt'])}")
        lines += [f"             {c['item']}: {c['error']}" for c in report["corrupt"]]
    if "original_size_px" in report:
        sz = report["original_size_px"]
        lines.append("size px    " + "  ".join(f"{k} {v['min']}/{v['p50']}/{v['max']} (min/median/max)"
                                               for k, v in sz.items()))
    if "aspect_ratio" in report:
        ar = report["aspect_ratio"]
        lines.append("aspect     width/height median " + ", ".join(f"{c} {v:.2f}" for c, v in ar["median_by_class"].items())
                     + f"; alone it separates the classes with AUROC {ar['auroc']:.3f}")
        if abs(ar["auroc"] - 0.5) > 0.15:
            lines.append("           a shortcut a model learns when the films are squashed to a square: hide it "
                         "(augment: strong jitters each film's width/height ratio)")
    for key, leak in report["leakage_in_source_splits"].items():
        lines.append(f"leakage    {leak['count']} {key} value(s) in more than one source split"
                     + (f", e.g. {', '.join(map(str, leak['examples']))}" if leak["count"] else ""))
    for s, info in report.get("split", {}).items():
        lines.append(f"split {s:<8} {info['images']:>6} images  {info['patients']:>5} patients  "
                     f"pneumonia {info['pneumonia_fraction']:.3f}")
    lines += format_composition(report.get("composition"))
    lines += [f"note       {n}" for n in report["notes"]]
    return "\n".join(lines)


def format_composition(found: dict | None) -> list[str]:
    """The composition table in words: a line per split (and site), one more per metadata column."""
    if not found or not found["groups"]:
        return []
    lines = [f"by {' and '.join(found['by'])} (images NORMAL/PNEUMONIA)"]
    for g in found["groups"]:
        where = "  ".join(g[k] for k in found["by"])
        lines.append(f"  {where:<24} {g['classes']['NORMAL']:>6}/{g['classes']['PNEUMONIA']:<6}")
        for column, counts in g["columns"].items():
            if "distinct" in counts:
                text = f"{counts['distinct']} distinct values"
            elif "median" in counts:
                text = ("none" if counts["median"] is None else
                        f"median {counts['median']:g} ({counts['min']:g}-{counts['max']:g})")
                text += f", {counts['missing']} missing" if counts["missing"] else ""
            else:
                text = "  ".join(f"{v} {c['NORMAL']}/{c['PNEUMONIA']}" for v, c in counts.items())
            lines.append(f"    {column:<10} {text}")
    return lines


# ----------------------------------------------------------------------------- prepare

@dataclass
class Prepared:
    """What training needs: the cache, the split table and each split's cache rows; ``publish_to``:
    where a cache too large to ship through the object store is copied for other nodes
    (runtime.put_data), None when the cache root is already visible to every node."""

    cache: Cache
    split: pd.DataFrame
    rows: dict[str, np.ndarray]
    report: dict
    publish_to: str | None = None


def prepare(kind: str, path: str | None, size: int, out: str | Path | None = None, *, val_fraction=0.15,
            test_fraction=0.15, seed=0, use_official_test=True, cache_root=None, strict=False,
            synthetic_images=SYNTHETIC_DEFAULT_IMAGES, synthetic_seed=0, manifest=None, publish_to=None,
            progress=True) -> Prepared:
    """List, decode (cached), split; write split.csv and data_report.json to ``out``. A manifest
    (read as ``manifest``, a ManifestFormat, says) keeps its pre-assigned splits."""
    source = list_source(kind, path, synthetic=SyntheticSet(synthetic_images, synthetic_seed), manifest=manifest)
    binding = SPLITS if kind == "manifest" else ("test",)
    if kind == "manifest" and use_official_test:
        check_assigned(source)
    cache = build_cache(source, size, cache_root, strict=strict, progress=progress)
    split = make_split(cache.index, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                       use_official_test=use_official_test, binding=binding)
    errors = pd.read_csv(cache.dir / "errors.csv")
    report = data_report(source, cache, errors, split)
    report["cache"] = str(cache.dir)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        split.to_csv(out / "split.csv", index=False)
        (out / "data_report.json").write_text(json.dumps(report, indent=1))
    return Prepared(cache, split, split_indices(split, cache), report, publish_to)


def check_assigned(source: Source) -> None:
    """Before decoding: a manifest's pre-assigned validation or test split must hold both classes."""
    for name in ("val", "test"):
        given = source.items.loc[source.items["source_split"] == name, "label"]
        if len(given) and given.nunique() < 2:
            raise DataError(f"{source.path}: the pre-assigned {name} split holds {len(given)} image(s), all "
                            f"{CLASSES[int(given.iat[0])]}; it needs both classes")
