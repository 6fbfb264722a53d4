"""Shared fixtures: the real data folder (skipped when absent) and a tiny Kaggle-style tree."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_ray import synthetic

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path_factory, monkeypatch):
    """Safety net: a test that forgets cache_root still never writes to ~/.cache."""
    monkeypatch.setenv("CXR_RAY_CACHE", str(tmp_path_factory.getbasetemp() / "default-cache"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` from the repo root; the test is skipped when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}: see README 'Real data'")
    return SHARED_DATA


# ----------------------------------------------------------------------------- Kaggle tree

def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def synthetic_pixels(item: synthetic.SyntheticItem, seed: int) -> np.ndarray:
    """A 40 x 48 (h x w) image: non-square like real films, so the cache crops."""
    return synthetic.render(item, seed, 48)[4:44]


@dataclass
class KaggleTree:
    root: Path  # what a user passes (--path): the download folder
    layout: Path  # the folder holding train/ test/ (double-nested chest_xray/chest_xray)
    labels: dict[str, int] = field(default_factory=dict)  # item ("train/NORMAL/x.png") -> label
    test_items: set[str] = field(default_factory=set)
    excluded: set[str] = field(default_factory=set)  # pool items that share a patient/bytes with test
    unparsed: set[str] = field(default_factory=set)
    duplicate_of: dict[str, str] = field(default_factory=dict)  # pool copy -> test original
    corrupt: str | None = None
    stray: list[Path] = field(default_factory=list)

    def path(self, item: str) -> Path:
        return self.layout / item


def write_kaggle_tree(base: Path, *, n_images: int = 30, seed: int = 3, corrupt: bool = False,
                      val: bool = False) -> KaggleTree:
    """Kaggle-style download under ``base``: base/chest_xray/chest_xray/{train,test}/{NORMAL,PNEUMONIA}.

    Images come from the synthetic generator (SYN-P00007-02 names, parsed like Kaggle's), in
    PNG, .jpeg and .jpg. The last two patients form the official test split; one more image of
    a test patient and a byte-identical copy of a test image (unparseable name) sit in train
    and must be excluded from the pool. Stray files: .DS_Store, AppleDouble ._ files, a text
    file and a shallower __MACOSX copy of the layout that must not be picked.
    """
    layout = base / "chest_xray" / "chest_xray"
    tree = KaggleTree(root=base, layout=layout)
    items = synthetic.listing(n_images, seed)
    patients = sorted({it.patient_index for it in items})
    test_patients = set(patients[-2:])
    formats = [("PNG", ".png"), ("JPEG", ".jpeg"), ("JPEG", ".jpg")]

    def write(item_path: str, data: bytes, label: int, split: str) -> None:
        p = layout / item_path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        tree.labels[item_path] = label
        if split == "test":
            tree.test_items.add(item_path)

    cls = ("NORMAL", "PNEUMONIA")
    test_written: list[tuple[str, bytes, int]] = []
    for k, it in enumerate(items):
        fmt, ext = formats[k % 3]
        split = "test" if it.patient_index in test_patients else "train"
        name = it.name.removesuffix(".png") + ext
        item_path = f"{split}/{cls[it.label]}/{name}"
        data = encode(synthetic_pixels(it, seed), fmt)
        write(item_path, data, it.label, split)
        if split == "test":
            test_written.append((item_path, data, it.label))

    # another image of a test patient, filed in train: excluded (shares the patient)
    t_item = next(it for it in items if it.patient_index in test_patients)
    extra = synthetic.SyntheticItem(f"{t_item.patient}-09.png", t_item.patient, t_item.label,
                                    t_item.patient_index, 9)
    extra_path = f"train/{cls[extra.label]}/{extra.name}"
    write(extra_path, encode(synthetic_pixels(extra, seed), "PNG"), extra.label, "train")
    tree.excluded.add(extra_path)
    # a byte-identical copy of a test image under an unparseable name: excluded (same bytes)
    orig_path, orig_data, orig_label = test_written[0]
    copy_path = f"train/{cls[orig_label]}/copy of scan.png"
    write(copy_path, orig_data, orig_label, "train")
    tree.excluded.add(copy_path)
    tree.unparsed.add(copy_path)
    tree.duplicate_of[copy_path] = orig_path
    # two more unparseable names (one patient per file)
    for j, name in enumerate(("scan_a.png", "scan_b.jpeg")):
        it = synthetic.SyntheticItem(name, "?", 0, 900 + j, 0)
        item_path = f"train/NORMAL/{name}"
        write(item_path, encode(synthetic_pixels(it, seed), "PNG" if name.endswith(".png") else "JPEG"), 0, "train")
        tree.unparsed.add(item_path)

    if val:
        for j, label in enumerate((0, 1)):
            it = synthetic.SyntheticItem(f"SYN-P{800 + j:05d}-00.jpeg", f"SYN-P{800 + j:05d}", label, 800 + j, 0)
            write(f"val/{cls[label]}/{it.name}", encode(synthetic_pixels(it, seed), "JPEG"), label, "val")

    if corrupt:
        it = synthetic.SyntheticItem("person999_bacteria_1.jpeg", "person999", 1, 999, 0)
        good = encode(synthetic.render(it, seed, 64), "JPEG")
        tree.corrupt = "train/PNEUMONIA/person999_bacteria_1.jpeg"
        write(tree.corrupt, good[: len(good) // 2], 1, "train")

    strays = [
        layout / ".DS_Store",
        layout / "train" / "NORMAL" / ".DS_Store",
        layout / "train" / "PNEUMONIA" / f"._{items[0].name}",
        layout / "train" / "NORMAL" / "notes.txt",
        base / "chest_xray" / ".DS_Store",
        # a shallower (depth 1) copy of the layout holding only macOS resource forks
        base / "__MACOSX" / "train" / "NORMAL" / "._IM-0001-0001.jpeg",
        base / "__MACOSX" / "train" / "PNEUMONIA" / "._person1_virus_1.jpeg",
    ]
    for s in strays:
        s.parent.mkdir(parents=True, exist_ok=True)
        s.write_bytes(b"\x00\x05\x16\x07 not an image")
    tree.stray = strays
    return tree


@pytest.fixture
def make_kaggle_tree(tmp_path):
    """Factory: ``make_kaggle_tree(corrupt=True, val=True, name="dl2")`` writes a tree under tmp_path."""
    def make(name: str = "download", **kwargs) -> KaggleTree:
        return write_kaggle_tree(tmp_path / name, **kwargs)
    return make


@pytest.fixture
def kaggle_tree(make_kaggle_tree) -> KaggleTree:
    return make_kaggle_tree()


# ----------------------------------------------------------------------------- processes and studies

TINY_SPEC = """
name: tiny
description: end-to-end test study (synthetic data, not medical)
seed: 0
data: {source: synthetic, image_size: 32, synthetic_images: 300}
model: {head: linear}
arms: [lcnet_050, mobilenetv3_small_050]
search_space:
  lr: {loguniform: [1e-3, 1e-2]}
  weight_decay: {loguniform: [1e-5, 1e-3]}
fixed: {batch_size: 32}
budget: {samples_per_arm: 3, max_epochs: 3, grace_period: 1, reduction_factor: 2}
resources: {workers_per_trial: 1, cpus_per_worker: 1, max_concurrent_trials: 2}
final: {seeds: [0, 1], bootstrap: 200}
"""
CLI = [str(REPO_ROOT / ".venv" / "bin" / "cxr-ray")] if (REPO_ROOT / ".venv" / "bin" / "cxr-ray").exists() \
    else ["cxr-ray"]


def session_pids(sid: int) -> list[int]:
    """Processes of a session: a CLI started with start_new_session and the local Ray it started."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid: int) -> None:
    """Stop what a test started (never `ray stop`, which would stop every Ray on the host)."""
    import os
    import signal
    import time
    for _ in range(50):
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


@pytest.fixture(scope="session")
def study_env(tmp_path_factory) -> dict:
    import os
    env = dict(os.environ)
    env["CXR_RAY_CACHE"] = str(tmp_path_factory.mktemp("study-cache"))
    env.pop("RAY_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env
