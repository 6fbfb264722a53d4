"""A train-only stand-in for "images collected apart": the shortcut-randomised view of a split.

A model trained on the Kaggle TRAIN folder can score well on validation carved from that folder by
reading how the films were acquired rather than the lungs, and such a model loses its specificity on
films collected apart. Scoring the external set while choosing a recipe spends it, so recipes are
compared on validation AND on this view of it, built from training data alone: every film keeps its
label and its anatomy, while the acquisition cues that separate the classes in train are redrawn at
random, independently of the label, so a model that reads them loses what they gave it.

The cues, and what the view does to each (measured in the official train folder: validation + train
pool, 224 px copies, AUROC of the statistic alone for PNEUMONIA; ``benchmarks/recipe_proxy.py cues``):
  * squash: the 224 px copies squash each film to a square, and the original width/height ratio
    alone separates the classes (AUROC 0.848 on the 120 original-resolution train films, median 1.20
    NORMAL vs 1.51 PNEUMONIA). Each film is re-squashed: its apparent width/height ratio is multiplied
    or divided (at random) by 1.15-1.35, about the gap between the classes, so that half the NORMAL
    films look as squashed as a PNEUMONIA film and half the PNEUMONIA films as little as a NORMAL one.
  * borders and markers: the brightest pixel of a corner (lead letters, text; 0.71) and the darkness
    of the lateral margins (0.61). The view is a crop that drops 6-10% of the film at each end of
    its longer axis and more of the other (the re-squash), then is resized back to full size.
  * windowing: NORMAL films carry more saturated highlights (fraction of pixels above 0.9: 0.85;
    99th percentile: 0.81; 1st percentile: 0.75; spread: 0.70). The view re-windows each film: its
    own 1st..99th percentile range is mapped onto a random black point (0-0.08) and white point
    (0.82-1.0) through a random gamma (0.75-1.33), so the range and the highlights say nothing.
A crop and a tone curve are what any chest film survives: the lungs, and the opacities that mark
pneumonia, are kept.

``view(images, seed)``: uint8 (N, S, S) -> uint8 (N, S, S), deterministic for a seed, numpy only,
no labels needed, so any split (validation, the internal test) can be scored on it.
"""
from __future__ import annotations

import numpy as np

SQUASH = (1.15, 1.35)  # |factor| by which each film's apparent width/height ratio is changed
KEEP = (0.84, 0.92)  # fraction of the longer crop axis kept (the rest is margin: borders, markers)
BLACK, WHITE, GAMMA = (0.0, 0.08), (0.82, 1.0), (0.75, 1.33)
PERCENTILES = (1.0, 99.0)  # each film's range, mapped onto the drawn black and white points
CHUNK = 256  # images resampled at once (bounds the float buffers at large sizes)
PARTS = ("squash", "margins", "window")


def view(images: np.ndarray, seed: int = 0, parts: tuple[str, ...] = PARTS) -> np.ndarray:
    """The shortcut-randomised view of ``images`` (uint8, N x S x S): re-squashed, margins cropped,
    re-windowed; every film's draws come from ``seed`` and its position in ``images``. ``parts``
    leaves out the others (to see which cue a model leans on); the draws stay the same."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.dtype != np.uint8:
        raise ValueError(f"proxy.view takes uint8 images of shape (N, S, S), got {images.dtype} {images.shape}")
    if not set(parts) <= set(PARTS):
        raise ValueError(f"proxy.view: unknown part(s) {sorted(set(parts) - set(PARTS))}; known: {', '.join(PARTS)}")
    n, size = images.shape[0], images.shape[1]
    # Eight uniform draws per film from (seed, row): a film's view does not depend on the others.
    u = np.array([np.random.default_rng([seed, row]).random(8) for row in range(n)]).reshape(n, 8).T
    squash = np.exp(np.where(u[0] < 0.5, -1, 1) * _between(u[1], *np.log(SQUASH)))  # > 1: narrower anatomy
    keep = _between(u[2], *KEEP)
    squash, keep = np.where("squash" in parts, squash, 1.0), np.where("margins" in parts, keep, 1.0)
    # Resizing a box of width/height ratio 1/squash to a square makes the anatomy squash times narrower.
    width, height = keep * np.minimum(squash, 1), keep * np.minimum(1 / squash, 1)
    left = (1 - width) / 2 * _between(u[3], 0.75, 1.25)
    top = (1 - height) / 2 * _between(u[4], 0.75, 1.25)
    black, white = _between(u[5], *BLACK), _between(u[6], *WHITE)
    gamma = np.exp(_between(u[7], *np.log(GAMMA)))

    out = np.empty_like(images)
    for start in range(0, n, CHUNK):
        part = slice(start, start + CHUNK)
        x = crop_resize(images[part], left[part] * size, top[part] * size, width[part] * size,
                        height[part] * size)
        out[part] = rewindow(x, black[part], white[part], gamma[part]) if "window" in parts else np.round(x)
    return out


def _between(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return lo + (hi - lo) * u


def crop_resize(images: np.ndarray, left, top, width, height) -> np.ndarray:
    """Each image's box (in pixels, any real position and size inside it) resampled bilinearly to
    the full S x S, as float32 in 0..255. Boxes are at most the image, so this only magnifies."""
    n, size = images.shape[0], images.shape[1]
    u = (np.arange(size) + 0.5) / size

    def axis(start, extent):  # per image: source coordinate of each output pixel, its lower neighbour, weight
        src = np.clip(start[:, None] + u[None] * extent[:, None] - 0.5, 0, size - 1)
        lo = np.minimum(np.floor(src).astype(np.intp), size - 2)
        return lo, (src - lo).astype(np.float32)

    x0, wx = axis(np.asarray(left, float), np.asarray(width, float))
    y0, wy = axis(np.asarray(top, float), np.asarray(height, float))
    k = np.arange(n)[:, None, None]
    ys, xs = y0[:, :, None], x0[:, None, :]
    img = images.astype(np.float32)
    top_row = img[k, ys, xs] * (1 - wx[:, None]) + img[k, ys, xs + 1] * wx[:, None]
    bottom_row = img[k, ys + 1, xs] * (1 - wx[:, None]) + img[k, ys + 1, xs + 1] * wx[:, None]
    return top_row * (1 - wy[:, :, None]) + bottom_row * wy[:, :, None]


def rewindow(x: np.ndarray, black, white, gamma) -> np.ndarray:
    """Each image's own 1st..99th percentile range mapped onto [black, white] (0..1) through
    ``gamma``; returns uint8."""
    lo, hi = np.percentile(x.reshape(len(x), -1), PERCENTILES, axis=1)
    t = np.clip((x - lo[:, None, None]) / np.maximum(hi - lo, 1.0)[:, None, None], 0, 1)
    t = t ** np.asarray(gamma)[:, None, None]
    y = np.asarray(black)[:, None, None] + (np.asarray(white) - np.asarray(black))[:, None, None] * t
    return np.round(y * 255).astype(np.uint8)
