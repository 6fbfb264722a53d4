"""Deterministic synthetic chest-radiograph-like images: the built-in demo data.

NOT MEDICAL DATA. These are drawings with the rough anatomy of a frontal chest film (body,
two lung fields, mediastinum, spine, ribs, diaphragm) under varying exposure and noise.
"PNEUMONIA" images add soft opacities or lobar consolidations of random size, position and
contrast inside a lung; some are faint enough to be missed, and some "NORMAL" images carry
small confounding shadows, so a small CNN learns the task well but not perfectly.

Every image is a pure function of (seed, patient, image index, size): rendering is
deterministic and drawn in normalised coordinates, so sizes differ only in resolution.
Each fake patient has fixed anatomy and 1-4 images, which exercises the patient-level split,
and metadata like a manifest's (sex, age, each image's view, the set's site name), drawn from
a stream of its own so that labels and pixels do not depend on it. The metadata only labels
the drawings (AP views are more common among "PNEUMONIA" patients, as among inpatients): it
changes no pixel, so subgroup tables have something to show without a shortcut to learn.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CxrError

GENERATOR_VERSION = 1
PNEUMONIA_FRACTION = 0.66  # about 1:2 NORMAL:PNEUMONIA, imbalanced as Kaggle's train split is (1:2.9, 0.74)
NOT_MEDICAL = "SYNTHETIC demo images drawn by cxr_ray.synthetic: not medical data"  # every such set's note


class SyntheticError(CxrError, ValueError):
    """Drawings that cannot be drawn (no images, a negative shift)."""


@dataclass(frozen=True)
class SyntheticSet:
    """Which drawings a synthetic source holds: how many, from which seed, at which site (``shift``
    > 0: another exposure and noise level, see ``render``)."""
    images: int = 1200
    seed: int = 0
    shift: float = 0.0

    def __post_init__(self):
        if self.images < 1:
            raise SyntheticError(f"synthetic images must be >= 1 (got {self.images})")
        if self.shift < 0:
            raise SyntheticError(f"synthetic shift must be >= 0 (got {self.shift:g})")

    @property
    def site(self) -> str:
        return f"synthetic-{self.seed}" + (f"-shift{self.shift:g}" if self.shift else "")


@dataclass(frozen=True)
class SyntheticItem:
    name: str  # e.g. SYN-P0007-02.png, parsed like a Kaggle file name
    patient: str
    label: int
    patient_index: int
    image_index: int
    sex: str = ""
    age: int = 0
    view: str = ""


def listing(n_images: int, seed: int) -> list[SyntheticItem]:
    """The fake patients and their images, about ``n_images`` in all. Patients of another seed have
    other names (``SYN-S3-P00007``), so two sets never share a patient id by accident."""
    rng = np.random.default_rng([seed, 0])
    meta = np.random.default_rng([seed, 3])  # its own stream: labels and pixels do not depend on it
    items: list[SyntheticItem] = []
    p = 0
    while len(items) < n_images:
        label = int(rng.random() < PNEUMONIA_FRACTION)
        count = min(int(rng.integers(1, 5)), n_images - len(items))
        patient = f"SYN-P{p:05d}" if seed == 0 else f"SYN-S{seed}-P{p:05d}"
        sex, age = ("F", "M")[int(meta.random() < 0.5)], int(meta.integers(18, 91))
        views = np.where(meta.random(count) < (0.45 if label else 0.2), "AP", "PA")
        items += [SyntheticItem(f"{patient}-{i:02d}.png", patient, label, p, i, sex, age, str(views[i]))
                  for i in range(count)]
        p += 1
    return items


def _smooth_step(v: np.ndarray, sharpness: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(v * sharpness, -40, 40)))


def _blob(x, y, cx, cy, sx, sy, angle):
    c, s = np.cos(angle), np.sin(angle)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    return np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))


def _low_freq(rng, size: int, cells: int) -> np.ndarray:
    """Smooth random field in [-1, 1] (bilinear upsampling of a coarse grid)."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1))
    t = np.linspace(0, cells, size)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def render(item: SyntheticItem, seed: int, size: int, shift: float = 0.0) -> np.ndarray:
    """One ``size`` x ``size`` uint8 image. ``shift`` > 0 draws it as another site would: brighter
    exposure, a harder contrast curve and more detector noise (0: the default site)."""
    anatomy = np.random.default_rng([seed, 1, item.patient_index])
    rng = np.random.default_rng([seed, 2, item.patient_index, item.image_index])

    # Per-image pose: a small shift, rotation and zoom of the coordinate grid.
    t = np.linspace(-1, 1, size)
    x0, y0 = np.meshgrid(t, t)
    rot, zoom = rng.normal(0, 0.05), rng.uniform(0.93, 1.07)
    dx, dy = rng.normal(0, 0.04, 2)
    x = (np.cos(rot) * x0 - np.sin(rot) * y0) * zoom + dx
    y = (np.sin(rot) * x0 + np.cos(rot) * y0) * zoom + dy

    # Anatomy, fixed per patient.
    body_w = anatomy.uniform(0.78, 0.95)
    lung_w, lung_h = anatomy.uniform(0.27, 0.34), anatomy.uniform(0.58, 0.70)
    lung_cx, lung_cy = anatomy.uniform(0.36, 0.44), anatomy.uniform(-0.12, 0.0)
    heart_w = anatomy.uniform(0.16, 0.24)
    rib_spacing, rib_phase = anatomy.uniform(0.13, 0.18), anatomy.uniform(0, 2 * np.pi)

    body = _smooth_step(1 - np.abs(x / body_w) ** 2.5, 8)
    lungs = []
    for side in (-1, 1):
        r = ((x - side * lung_cx) / lung_w) ** 2 + ((y - lung_cy) / lung_h) ** 2
        r = r + 0.35 * np.maximum(y - lung_cy, 0) * (side * (x - side * lung_cx) < 0)  # cardiac notch
        lungs.append(_smooth_step(1 - r, 10))
    lung = np.maximum(*lungs)
    heart = _blob(x, y, 0.06, lung_cy + 0.3, heart_w, 0.28, 0.3)
    spine = _smooth_step(0.06 - np.abs(x), 60)
    diaphragm = _smooth_step(y - (lung_cy + lung_h * 0.92) + 0.15 * x**2, 14)
    ribs = (np.sin(2 * np.pi * (y + 0.35 * x**2) / rib_spacing + rib_phase) > 0.55).astype(float)

    img = 0.04 + 0.42 * body
    img = img * (1 - 0.62 * lung) + 0.16 * diaphragm * body
    img += 0.45 * heart * body + 0.22 * spine * body
    img += 0.10 * ribs * body * (0.3 + 0.7 * lung)
    img += 0.05 * _low_freq(rng, size, 6) * lung  # vascular markings, roughly

    # Findings. Opacities sit inside a lung; normals sometimes carry small shadows.
    texture = 0.7 + 0.3 * _low_freq(rng, size, 12)
    if item.label == 1:
        for _ in range(int(rng.integers(1, 4))):
            side = rng.choice((-1, 1))
            cx = side * lung_cx + rng.normal(0, lung_w * 0.45)
            cy = lung_cy + rng.uniform(-0.45, 0.75) * lung_h
            sx, sy = rng.uniform(0.10, 0.28, 2)
            amp = 0.10 + 0.40 * rng.random() ** 1.5  # many faint findings, a few dense ones
            img += amp * _blob(x, y, cx, cy, sx, sy, rng.uniform(0, np.pi)) * texture * lung
    for _ in range(int(rng.integers(0, 3))):
        cx, cy = rng.uniform(-0.6, 0.6), rng.uniform(-0.5, 0.6)
        img += rng.uniform(0.02, 0.10) * _blob(x, y, cx, cy, 0.03, 0.03, 0.0) * body

    # Exposure and detector noise.
    img = img * (rng.uniform(0.75, 1.25) + 0.25 * shift) + rng.normal(0, 0.04)
    img = np.clip(img, 0, 1) ** (rng.uniform(0.75, 1.35) * (1 + 0.4 * shift))
    img += rng.normal(0, rng.uniform(0.01, 0.04) + 0.03 * shift, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def write_site(folder: str, drawn: SyntheticSet, size: int = 128) -> dict:
    """Write a synthetic set as a site would send it: ``folder``/images/*.png and ``folder``/manifest.csv
    (path, label, patient, site, sex, age, view) with its sidecar, so that the manifest path (and the
    metadata a subgroup table needs) can be tried end to end without medical data."""
    import os

    import pandas as pd
    from PIL import Image

    from . import manifest
    from .data import check_image_size
    check_image_size(size, "the written images' size")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    items = listing(drawn.images, drawn.seed)
    for it in items:
        Image.fromarray(render(it, drawn.seed, size, drawn.shift)).save(os.path.join(folder, "images", it.name))
    table = pd.DataFrame({"path": [os.path.join(folder, "images", it.name) for it in items],
                          "label": ["PNEUMONIA" if it.label else "NORMAL" for it in items],
                          "patient": [it.patient for it in items], "site": drawn.site,
                          "sex": [it.sex for it in items], "age": [it.age for it in items],
                          "view": [it.view for it in items]})
    positive = sum(it.label for it in items)
    info = {"command": f"cxr-ray data synthetic --images {drawn.images} --seed {drawn.seed} --shift {drawn.shift:g} "
                       f"--size {size}",
            "source": f"cxr_ray.synthetic v{GENERATOR_VERSION}",
            "counts": {"images": len(items), "patients": len({it.patient for it in items}),
                       "positive": positive, "negative": len(items) - positive},
            "notes": [NOT_MEDICAL]}
    return manifest.write(table, os.path.join(folder, "manifest.csv"), info)
