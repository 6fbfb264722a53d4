"""Shared fixtures: the real data folder (skipped when absent) and a tiny Kaggle-style tree."""
from __future__ import annotations

import contextlib
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


def needed(what: str) -> None:
    """A prerequisite is missing: skipped on a developer's machine, a failure under CI (CI=true),
    where .ci/run provides everything, so that a green CI has run every test."""
    import os
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (required under CI)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` from the repo root (see README 'Real data')."""
    if not SHARED_DATA.is_dir():
        needed(f"real data not found at {SHARED_DATA}: see README 'Real data'")
    return SHARED_DATA


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance started the way studies start it (dashboard on 127.0.0.1); its URL.
    Shut down afterwards unless the test found Ray already running."""
    import ray

    from cxr_ray import runtime
    started = not ray.is_initialized()
    url = runtime.connect(num_cpus=2, quiet=True)
    yield url
    if started:
        ray.shutdown()


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

# ASHA's decisions in the tiny studies must not depend on how well a 32 px model happens to learn in an
# epoch (CPU float results differ between machines): selection is on validation loss, and seed 25 draws
# configurations 0 and 2 with sane learning rates and configuration 1 with lr 5, which saturates every
# output in its first epoch (validation loss above 5 against about 0.7; checked on both backbones).
# With two trials at a time each arm meets its rungs in configuration order, so configuration 1 is
# stopped at epoch 1 (below configuration 0) and configuration 2 passes epoch 1 (above the median of
# those two), whatever the sane ones learned.
TINY_SPEC = """
name: tiny
description: end-to-end test study (synthetic data, not medical)
seed: 25
data: {source: synthetic, image_size: 32, synthetic_images: 300}
model: {head: linear}
arms: [lcnet_050, mobilenetv3_small_050]
search_space:
  lr: {choice: [2e-3, 6e-3, 5.0]}
  weight_decay: {loguniform: [1e-5, 1e-3]}
fixed: {batch_size: 32}
budget: {samples_per_arm: 3, max_epochs: 3, grace_period: 1, reduction_factor: 2}
resources: {workers_per_trial: 1, cpus_per_worker: 1, max_concurrent_trials: 2}
selection: {metric: val_loss, mode: min}
final: {seeds: [0, 1], bootstrap: 200}
"""
CLI = [str(REPO_ROOT / ".venv" / "bin" / "cxr-ray")] if (REPO_ROOT / ".venv" / "bin" / "cxr-ray").exists() \
    else ["cxr-ray"]


def dashboard_get(url: str, path: str, patience: float = 30, **params):
    """GET from a Ray dashboard's HTTP API with the cluster's token (Ray 2.60 keeps token auth on).

    A 5xx is asked again for up to ``patience`` seconds: the log API looks files up through each
    node's agent, and on a loaded machine that lookup can time out (seen once in CI) before it works."""
    import os
    import time

    import requests
    token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
    deadline = time.time() + patience
    while True:
        response = requests.get(url.rstrip("/") + path, params=params, timeout=30,
                                headers={"Authorization": f"Bearer {token}"})
        if response.status_code < 500 or time.time() > deadline:
            break
        time.sleep(1)
    assert response.ok, f"{response.status_code} from {response.url}: {response.text[:500]}"
    return response


def scrape_metrics(prefixes: tuple[str, ...], found: list, done, grace: float = 15) -> None:
    """Poll this node's Prometheus endpoint (what Grafana and any scraper read) while a run trains,
    collecting the lines of the named metrics; Ray exports worker metrics every few seconds and
    drops them some 20 s after the worker exits, so the scrape runs during the run and up to
    ``grace`` seconds after ``done`` is set, until every prefix was seen."""
    import time

    import ray
    import requests
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    until = None
    while until is None or time.time() < until:
        time.sleep(1)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found += [ln for ln in text.splitlines() if ln.startswith(prefixes)]
        if all(any(ln.startswith(p) for ln in found) for p in prefixes) and done.is_set():
            return
        if done.is_set() and until is None:
            until = time.time() + grace


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


# ----------------------------------------------------------------------------- a finished study, without Ray

FAKE_SEPARATION = {"resnet18": 0.95, "densenet": 1.2, "effnet": 0.45}  # arm -> how far its test scores separate classes
FAKE_BEST_ARM = "densenet"


def fake_spec_raw(unmatched: bool = False) -> dict:
    """Three arms x four configurations, ASHA rungs at epochs 1 and 2 of 4, final seeds 0/1/2."""
    raw = {"name": "fake", "description": "report test study (synthetic data, not medical)", "seed": 0,
           "data": {"source": "synthetic", "image_size": 64, "synthetic_images": 200},
           "model": {"head": "linear"},
           "arms": [{"name": "resnet18", "backbone": "resnet18"}, {"name": "densenet", "backbone": "densenet121"},
                    {"name": "effnet", "backbone": "efficientnet_b0"}],
           "search_space": {"lr": {"loguniform": [1e-4, 1e-2]}, "weight_decay": {"loguniform": [1e-5, 1e-3]}},
           "fixed": {"batch_size": 32},
           "budget": {"samples_per_arm": 4, "max_epochs": 4, "grace_period": 1, "reduction_factor": 2},
           "resources": {"workers_per_trial": 2, "cpus_per_worker": 1, "max_concurrent_trials": 2},
           "final": {"seeds": [0, 1, 2], "bootstrap": 100}}
    if unmatched:  # the seed-replication shape: each arm keeps the optimiser settings of its original paper
        raw["unmatched"] = True
        del raw["search_space"]["lr"]
        for arm, (optimizer, lr, epochs) in zip(raw["arms"], [("sgd", 0.01, 4), ("adam", 3e-4, 3), ("adamw", 1e-3, 2)]):
            arm["settings"] = {"optimizer": optimizer, "lr": lr, "epochs": epochs}
    return raw


def write_fake_study(root: Path, *, unmatched: bool = False) -> Path:
    """A finished study directory written in the study's own formats, without Ray: the real ASHA
    bookkeeping decides on simulated learning curves, the study's own functions write the trial
    summary, budget and best configurations, and the real final evaluation scores simulated test
    probabilities (FAKE_BEST_ARM clearly best). Deterministic."""
    import json
    from types import SimpleNamespace

    import pandas as pd
    from ray.tune.schedulers import TrialScheduler

    from cxr_ray import evaluation, spec as specs, storage, study
    from cxr_ray.scheduler import PerArmASHA

    root.mkdir(parents=True, exist_ok=True)
    sdir = str(root)
    spec = specs.validate(fake_spec_raw(unmatched), f"{root}/fake.yaml")
    (root / "spec.yaml").write_text(specs.dump(spec))
    rng = np.random.default_rng(0)

    # 100 patients with two images each; the last 30 patients (60 images) are the test split
    index = pd.DataFrame([{"item": f"SYN-P{p:05d}-{k:02d}.png", "label": int(p % 3 != 0), "patient": f"SYN-P{p:05d}"}
                          for p in range(100) for k in range(2)])
    parts = np.where(index.index < 100, "train", np.where(index.index < 140, "val", "test"))
    split = index.assign(sha1=[f"{i:040x}" for i in range(len(index))], split=parts, reason="")
    storage.write_csv(f"{sdir}/split.csv", split)
    storage.write_json(f"{sdir}/data_report.json", {
        "source": "synthetic", "path": "synthetic:0:200",
        "notes": ["SYNTHETIC demo images drawn by cxr_ray.synthetic: not medical data"],
        "images": len(index), "patients": 100,
        "split": {name: {"images": int((parts == name).sum()), "patients": int(index[parts == name].patient.nunique()),
                         "pneumonia_fraction": round(float(index[parts == name].label.mean()), 4)}
                  for name in ("test", "train", "val")}})
    configs = specs.sample_configs(spec)
    storage.write_csv(f"{sdir}/configs.csv", pd.DataFrame(configs).rename_axis("config_id").reset_index())

    def epoch_row(phase, tid, arm, cid, seed, params, epoch, value, start):
        t = 2.0 + 0.1 * epoch
        return {"phase": phase, "trial_id": tid, "arm": arm, "config_id": cid, "seed": seed, "status": "ok",
                **{f"hp_{k}": v for k, v in params.items()}, "epoch": epoch, "train_loss": 0.7 - 0.05 * epoch,
                "val_loss": 0.75 - 0.3 * value, "val_auroc": value, "val_accuracy": value - 0.05,
                "val_sensitivity": value, "val_specificity": value - 0.1, "val_f1": value - 0.03,
                "val_accuracy_youden": value - 0.04, "val_sensitivity_youden": value, "val_specificity_youden": value,
                "val_f1_youden": value - 0.02, "threshold": 0.5, "images_per_s": 300.0, "data_wait_fraction": 0.01,
                "epoch_time_s": t, "train_time_s": t - 0.2, "lr": params.get("lr", 1e-3),
                "timestamp": 1795849000 + start, "time_total_s": 20.0 + t * epoch,
                "checkpoint": f"runs/{tid}/checkpoint_{epoch:06d}"}

    # search: the real per-arm ASHA rule on simulated curves (good lr near 1e-3, better arms higher)
    asha = PerArmASHA(metric="val_auroc", mode="max", max_t=spec.budget.max_epochs, grace_period=1,
                      reduction_factor=2, state_path=f"{sdir}/asha_state.json")
    rows = []
    for cid, params in enumerate(configs):
        for a, arm in enumerate(spec.arm_names):
            tid = f"aaaaa_{cid * len(spec.arm_names) + a:05d}"
            quality = 0.55 + 0.12 * FAKE_SEPARATION[arm] - 0.06 * abs(np.log10(params.get("lr", 1e-3)) + 3)
            for epoch in range(1, spec.epochs_for(arm) + 1):
                value = float(np.clip(quality - 0.2 * 0.5 ** epoch + rng.normal(0, 0.01), 0, 1))
                rows.append(epoch_row("search", tid, arm, cid, spec.seed, params, epoch, value, len(rows)))
                if epoch < spec.budget.max_epochs and asha.decide(tid, arm, epoch, value) == TrialScheduler.STOP:
                    break
    trials = pd.DataFrame(rows)
    summary = study.trial_summary(trials, spec, asha.stopped)
    best = study.best_configs(summary, spec, configs)
    storage.write_csv(f"{sdir}/trials.csv", trials)
    storage.write_csv(f"{sdir}/trial_summary.csv", summary)
    storage.write_csv(f"{sdir}/budget.csv", study.budget_table(summary, spec))
    storage.write_json(f"{sdir}/best_configs.json", best)

    # final: each arm's best configuration x every seed; the real evaluation scores their test probabilities
    test_rows, val_rows = np.flatnonzero(parts == "test"), np.flatnonzero(parts == "val")
    y, y_val = index["label"].to_numpy()[test_rows], index["label"].to_numpy()[val_rows]
    patient_effect = np.repeat(rng.normal(0, 0.6, len(test_rows) // 2), 2)  # hard patients are hard for every arm
    val_rng = np.random.default_rng(1)
    rows = []
    for seed in spec.final.seeds:
        for a, arm in enumerate(spec.arm_names):
            tid = f"bbbbb_{seed * len(spec.arm_names) + a:05d}"
            params = best[arm]["params"]
            epochs = spec.final_epochs_for(arm)
            for epoch in range(1, epochs + 1):
                rows.append(epoch_row("final", tid, arm, best[arm]["config_id"], seed, params, epoch,
                                      0.6 + 0.1 * FAKE_SEPARATION[arm] + 0.01 * seed, len(rows)))
            logit = FAKE_SEPARATION[arm] * (2 * y - 1) + patient_effect + rng.normal(0, 0.8, len(y))
            ckpt = root / rows[-1]["checkpoint"]
            ckpt.mkdir(parents=True, exist_ok=True)
            np.save(ckpt / "test_probabilities.npy", (1 / (1 + np.exp(-logit))).astype(np.float32))
            val_logit = FAKE_SEPARATION[arm] * (2 * y_val - 1) + val_rng.normal(0, 0.8, len(y_val))
            np.save(ckpt / "val_probabilities.npy", (1 / (1 + np.exp(-val_logit))).astype(np.float32))
            (ckpt / "meta.json").write_text(json.dumps({"backbone": spec.arm(arm).backbone,
                                                       "threshold": 0.5 + 0.02 * (seed - 1)}))
    final_trials = pd.DataFrame(rows)
    storage.write_csv(f"{sdir}/final_trials.csv", final_trials)
    prepared = SimpleNamespace(rows={"test": test_rows, "val": val_rows}, cache=SimpleNamespace(index=index))
    evaluation.evaluate(spec, sdir, prepared, final_trials)
    storage.write_json(f"{sdir}/study.json", {
        "name": spec.name, "spec_hash": spec.hash, "finished": True, "driver_wall_s": 321.5,
        "command": f"cxr-ray study run studies/fake.yaml --out {sdir}",
        "ray_resources": {"CPU": 2.0, "memory": 8.0 * 2**30, "object_store_memory": 2.0 * 2**30,
                          "node:127.0.0.1": 1.0}})
    return root


@pytest.fixture(scope="session")
def fake_study_dir(tmp_path_factory) -> Path:
    """A finished three-arm study directory (see write_fake_study); copy it before changing it."""
    return write_fake_study(tmp_path_factory.mktemp("fake-study") / "fake")


# ----------------------------------------------------------------------------- browser

def chromium() -> str:
    """The Chromium binary for the browser tests. Missing, the test is skipped on a developer's
    machine but fails under CI (CI=true), where .ci/run installs it: a green CI must have run them."""
    import os
    import shutil
    for candidate in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if candidate and os.path.exists(candidate):
            return candidate
    needed("chromium is not installed (apt-get install chromium; .ci/run installs it)")


@contextlib.contextmanager
def headless_tab(**page_options):
    """A tab (``browser.new_page(**page_options)``) in headless Chromium, closed afterwards."""
    exe = chromium()
    from playwright.sync_api import sync_playwright
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=args)
        try:
            yield browser.new_page(**page_options)
        finally:
            browser.close()
