"""The shortcut-randomised view (cxr_ray.proxy): what a recipe comparison relies on it for."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_ray import metrics, proxy


def rectangle_films(n: int, size: int = 128, width: int = 60, height: int = 60) -> np.ndarray:
    """Dark films with a bright centred rectangle (the 'anatomy'), a little texture and a ramp."""
    rng = np.random.default_rng(7)
    films = np.full((n, size, size), 30.0) + np.linspace(0, 20, size)[None, None] + rng.normal(0, 3, (n, size, size))
    top, left = (size - height) // 2, (size - width) // 2
    films[:, top:top + height, left:left + width] += 150
    return np.clip(films, 0, 255).astype(np.uint8)


def bright_box(film: np.ndarray) -> tuple[int, int]:
    """Width and height of the pixels above the film's mid-level."""
    mask = film > (int(film.min()) + int(film.max())) / 2
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return xs[-1] - xs[0] + 1, ys[-1] - ys[0] + 1


def test_deterministic_per_seed_shape_and_dtype_kept():
    films = rectangle_films(12, size=64, width=30, height=30)
    a, b = proxy.view(films, seed=3), proxy.view(films, seed=3)
    assert a.dtype == np.uint8 and a.shape == films.shape
    assert np.array_equal(a, b)
    assert not np.array_equal(a, proxy.view(films, seed=4))
    assert not np.array_equal(a, films)


def test_a_films_view_depends_only_on_its_row_and_the_seed():
    """Labels stay aligned: row i of the view is film i's, whatever else is in the batch (so a
    split can be viewed in parts or whole)."""
    films = rectangle_films(300, size=32, width=12, height=20)  # more than one internal chunk
    whole = proxy.view(films, seed=1)
    assert np.array_equal(proxy.view(films[:5], seed=1), whole[:5])
    tall = rectangle_films(1, size=64, width=16, height=40)[0]
    wide = rectangle_films(1, size=64, width=40, height=16)[0]
    mixed = proxy.view(np.stack([tall, wide, tall]), seed=0)
    shapes = [bright_box(f) for f in mixed]
    assert shapes[0][0] < shapes[0][1] and shapes[1][0] > shapes[1][1] and shapes[2][0] < shapes[2][1]


def test_every_film_is_re_squashed_both_ways_by_the_promised_factor():
    films = rectangle_films(60)
    ratios = []
    for film in proxy.view(films, seed=0):
        w, h = bright_box(film)
        ratios.append(w / h)  # the rectangle was square
    change = np.abs(np.log(ratios))
    tolerance = 0.04  # a pixel of rounding at each end of a 60-80 px side
    assert change.min() >= np.log(proxy.SQUASH[0]) - tolerance
    assert change.max() <= np.log(proxy.SQUASH[1]) + tolerance
    assert 15 <= sum(r > 1 for r in ratios) <= 45  # wider and narrower, about half each


def test_the_outer_margin_never_reaches_the_view():
    """Borders and corner markers live in a film's outer few percent: a 2% frame (here a
    checkerboard of black and white, which would show as jagged edges) is always cropped away."""
    films = rectangle_films(40, size=100, width=30, height=30)
    checker = np.where((np.arange(100)[:, None] + np.arange(100)[None]) % 2 == 0, 0, 255)
    ring = np.zeros((100, 100), bool)
    ring[:2], ring[-2:], ring[:, :2], ring[:, -2:] = True, True, True, True
    films[:, ring] = checker[ring]

    def jagged(film: np.ndarray) -> int:  # the largest step between neighbours along the four edges
        edges = (film[0], film[-1], film[:, 0], film[:, -1])
        return max(int(np.abs(np.diff(e.astype(int))).max()) for e in edges)

    whole = proxy.crop_resize(films, *(np.full(len(films), v) for v in (0.0, 0.0, 100.0, 100.0)))
    assert jagged(whole[0]) == 255  # the full box keeps the frame
    assert max(jagged(film) for film in proxy.view(films, seed=0)) < 40


def test_windowing_cues_are_redrawn_independently_of_the_class():
    """Two classes that differ only in exposure (range and saturated highlights) are told apart by
    their 99th percentile and highlight fraction as given, and no longer on the view."""
    rng = np.random.default_rng(0)
    n = 200
    y = np.r_[np.zeros(n // 2), np.ones(n // 2)].astype(int)
    base = rectangle_films(n, size=48, width=24, height=30).astype(float)
    scaled = np.where(y[:, None, None] == 0, base * 1.25, base * 0.9) + rng.normal(0, 4, base.shape)
    films = np.clip(scaled, 0, 255).astype(np.uint8)
    viewed = proxy.view(films, seed=0)
    p99 = lambda x: np.percentile(x.reshape(len(x), -1), 99, axis=1)  # noqa: E731
    highlights = lambda x: (x > 0.9 * 255).mean((1, 2))  # noqa: E731
    for statistic in (p99, highlights):
        assert abs(metrics.auroc(y, statistic(films)) - 0.5) > 0.45
        assert abs(metrics.auroc(y, statistic(viewed)) - 0.5) < 0.12


def test_rejects_what_is_not_a_stack_of_square_uint8_films():
    with pytest.raises(ValueError, match="uint8 images of shape"):
        proxy.view(np.zeros((2, 32, 40), np.uint8))
    with pytest.raises(ValueError, match="uint8 images of shape"):
        proxy.view(np.zeros((2, 32, 32), np.float32))


def test_parts_can_be_left_out_one_cue_at_a_time():
    films = rectangle_films(20, size=64, width=30, height=30)
    assert np.array_equal(proxy.view(films, seed=0, parts=()), films)
    windowed = proxy.view(films, seed=0, parts=("window",))
    assert all(bright_box(f) == bright_box(o) for f, o in zip(windowed, films))  # geometry as it was
    assert not np.array_equal(windowed, films)
    squashed = proxy.view(films, seed=0, parts=("squash",))
    assert all(w != h for w, h in map(bright_box, squashed))
    with pytest.raises(ValueError, match="unknown part"):
        proxy.view(films, parts=("blur",))
