"""Data layer: patient ids, sources, the patient-level split, the decoded cache, prepare()."""
from __future__ import annotations

import hashlib
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_ray import data, imaging, synthetic
from cxr_ray.data import DataError

from conftest import encode

SIZE = 32


def listed(tree, **kwargs) -> data.Source:
    return data.list_source("kaggle", str(tree.root), **kwargs)


def with_sha1(source: data.Source) -> pd.DataFrame:
    """The source's items plus the sha1 of each file's bytes (what the cache index carries)."""
    items = source.items.copy()
    items["sha1"] = [hashlib.sha1((Path(source.path) / i).read_bytes()).hexdigest() for i in items["item"]]
    return items


def assert_no_leak(split: pd.DataFrame) -> None:
    """No two of train/val/test share a patient or an image's bytes."""
    used = split[split["split"] != "excluded"]
    for key in ("patient", "sha1"):
        members = {name: set(g[key]) for name, g in used.groupby("split")}
        for a, b in itertools.combinations(sorted(members), 2):
            assert not members[a] & members[b], f"{key} in {a} and {b}: {sorted(members[a] & members[b])[:5]}"


# ----------------------------------------------------------------------------- patient ids

@pytest.mark.parametrize("name, patient", [
    ("person1180_virus_2010_1.jpeg", "person1180"),
    ("person100_bacteria_475.jpeg", "person100"),
    ("IM-0511-0001-0002.jpeg", "IM-0511"),
    ("NORMAL2-IM-0373-0001.jpeg", "NORMAL2-IM-0373"),
    ("train/PNEUMONIA/person1180_virus_2010_1.jpeg", "person1180"),  # a path: the base name counts
    ("SYN-P00007-02.png", "SYN-P00007"),
    ("scan_0001.jpeg", None),
    ("copy of person1_virus_1.jpeg", None),
    ("IM0511-0001.jpeg", None),
    ("", None),
])
def test_parse_patient(name, patient):
    assert data.parse_patient(name) == patient


def test_unparsed_names_are_one_patient_per_file_and_reported(kaggle_tree):
    source = listed(kaggle_tree)
    items = source.items.set_index("item")
    unparsed = items.loc[sorted(kaggle_tree.unparsed)]
    assert not unparsed["patient_parsed"].any()
    assert unparsed["patient"].nunique() == len(unparsed)  # never lumped into one "None" patient
    assert not items.drop(index=unparsed.index)["patient"].isin(unparsed["patient"]).any()
    assert items.drop(index=unparsed.index)["patient_parsed"].all()
    report = data.data_report(source)
    assert report["unparsed_names"] == len(kaggle_tree.unparsed) == 3


# ----------------------------------------------------------------------------- Kaggle listing

def test_kaggle_listing_finds_double_nested_layout_and_skips_strays(kaggle_tree):
    source = listed(kaggle_tree)
    assert source.kind == "kaggle"
    assert Path(source.path) == kaggle_tree.layout  # not the shallower __MACOSX copy
    assert dict(zip(source.items["item"], source.items["label"])) == kaggle_tree.labels
    assert not source.items["item"].str.contains("__MACOSX|DS_Store|/\\._|notes", regex=True).any()
    assert any("skipped" in n for n in source.notes)
    # labels come from the class folder, splits from the split folder
    assert (source.items["label"] == source.items["item"].str.contains("/PNEUMONIA/").astype(int)).all()
    assert (source.items["source_split"] == source.items["item"].str.split("/").str[0]).all()
    assert set(source.items["source_split"]) == {"train", "test"}  # no val folder: fine
    exts = {Path(i).suffix for i in source.items["item"]}
    assert {".png", ".jpeg", ".jpg"} <= exts


def test_kaggle_listing_with_val_folder(make_kaggle_tree):
    tree = make_kaggle_tree(val=True)
    source = listed(tree)
    assert set(source.items["source_split"]) == {"train", "val", "test"}
    assert (source.items["source_split"] == "val").sum() == 2


def test_kaggle_listing_accepts_the_layout_root_itself(kaggle_tree):
    source = data.list_source("kaggle", str(kaggle_tree.layout))
    assert Path(source.path) == kaggle_tree.layout
    assert len(source.items) == len(kaggle_tree.labels)


def test_missing_path_and_unknown_source_raise_naming_them(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DataError, match="no-such-folder"):
        data.list_source("kaggle", str(missing))
    with pytest.raises(DataError, match="dicomdir"):
        data.list_source("dicomdir", str(tmp_path))
    with pytest.raises(DataError, match="needs a path"):
        data.list_source("kaggle", None)
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="empty.*no Kaggle layout"):
        data.list_source("kaggle", str(empty))


# ----------------------------------------------------------------------------- split

def synthetic_index(n: int = 3000, seed: int = 0, duplicates: int = 40) -> pd.DataFrame:
    """An index like the cache's: synthetic patients (1-4 images) plus cross-patient duplicates."""
    items = synthetic.listing(n, seed)
    df = pd.DataFrame({
        "item": [f"train/{('NORMAL', 'PNEUMONIA')[it.label]}/{it.name}" for it in items],
        "label": [it.label for it in items],
        "patient": [it.patient for it in items],
        "sha1": [hashlib.sha1(it.name.encode()).hexdigest() for it in items],
        "source_split": "train",
    })
    # byte-identical duplicates between different patients of the same class
    rng = np.random.default_rng(seed)
    for a in rng.choice(len(df) - 1, duplicates, replace=False):
        b = next(j for j in range(a + 1, len(df)) if df.at[j, "patient"] != df.at[a, "patient"]
                 and df.at[j, "label"] == df.at[a, "label"])
        df.at[b, "sha1"] = df.at[a, "sha1"]
    return df


def test_split_has_no_patient_or_bytes_in_two_splits():
    index = synthetic_index()
    assert index["sha1"].duplicated().sum() > 0
    split = data.make_split(index, seed=1)
    assert set(split["split"]) == {"train", "val", "test"}
    assert len(split) == len(index) and list(split["item"]) == list(index["item"])
    assert_no_leak(split)


def test_split_is_stratified_and_sized():
    index = synthetic_index()
    pool_fraction = index["label"].mean()
    split = data.make_split(index, val_fraction=0.15, test_fraction=0.2, seed=0)
    for name, want in (("val", 0.15), ("test", 0.2), ("train", 0.65)):
        part = split[split["split"] == name]
        assert abs(len(part) / len(split) - want) < 0.02, name
        assert abs(part["label"].mean() - pool_fraction) < 0.05, name


def test_split_is_deterministic_by_seed():
    index = synthetic_index(1000)
    a = data.make_split(index, seed=7)
    b = data.make_split(index, seed=7)
    pd.testing.assert_frame_equal(a, b)
    c = data.make_split(index, seed=8)
    assert (a["split"] != c["split"]).sum() > 50


def test_split_keeps_a_patient_with_both_labels_together():
    # a patient (or a duplicated file) can carry both labels; it must still land in one split
    rows = []
    for p in range(300):
        for k in range(2):
            label = k if p % 3 == 0 else p % 2
            rows.append((f"train/x/P{p}-{k}.png", label, f"P{p}", f"sha-{p}-{k}", "train"))
    rows.append(("train/NORMAL/dup.png", 0, "Q1", "same-bytes", "train"))
    rows.append(("train/PNEUMONIA/dup.png", 1, "Q2", "same-bytes", "train"))
    index = pd.DataFrame(rows, columns=["item", "label", "patient", "sha1", "source_split"])
    for seed in range(3):
        split = data.make_split(index, seed=seed)
        assert_no_leak(split)
        assert abs(split.loc[split["split"] == "val", "label"].mean() - index["label"].mean()) < 0.1


def test_check_split_raises_on_a_leaky_table():
    ok = pd.DataFrame({"item": list("abcd"), "patient": ["p1", "p1", "p2", "p3"],
                       "sha1": ["s1", "s2", "s3", "s4"], "split": ["train", "train", "val", "test"]})
    data.check_split(ok)
    leaky_patient = ok.assign(split=["train", "val", "val", "test"])
    with pytest.raises(DataError, match="patient.*p1"):
        data.check_split(leaky_patient)
    leaky_bytes = ok.assign(sha1=["s1", "s2", "s3", "s3"])
    with pytest.raises(DataError, match="sha1.*s3"):
        data.check_split(leaky_bytes)
    # excluded rows do not count as a split
    data.check_split(ok.assign(split=["train", "excluded", "val", "test"]))


def test_official_test_split_kept_and_leaking_pool_items_excluded(kaggle_tree):
    index = with_sha1(listed(kaggle_tree))
    split = data.make_split(index, val_fraction=0.2, seed=0).set_index("item")
    assert set(split.index[split["split"] == "test"]) == kaggle_tree.test_items
    excluded = split[split["split"] == "excluded"]
    assert set(excluded.index) == kaggle_tree.excluded
    assert excluded["reason"].str.contains("official test").all()
    assert_no_leak(split.reset_index())
    # without the official test, test is carved from the whole pool and nothing is excluded
    carved = data.make_split(index, val_fraction=0.2, test_fraction=0.2, seed=0, use_official_test=False)
    assert "excluded" not in set(carved["split"])
    assert set(carved["split"]) == {"train", "val", "test"}
    assert_no_leak(carved)


def test_split_fractions_are_validated():
    index = synthetic_index(100, duplicates=0)
    with pytest.raises(DataError, match="val_fraction"):
        data.make_split(index, val_fraction=1.2)
    with pytest.raises(DataError, match="< 1"):
        data.make_split(index, val_fraction=0.6, test_fraction=0.5)


def test_split_of_the_real_kaggle_train_listing(shared_data):
    source = data.list_kaggle(str(shared_data / "chest_xray_224"))
    assert len(source.items) == 5216
    assert source.items["label"].value_counts().to_dict() == {0: 1341, 1: 3875}
    assert source.items["patient_parsed"].all()
    index = with_sha1(source)
    dup = index[index.duplicated("sha1", keep=False)]
    assert dup["sha1"].nunique() == 24  # known byte-identical groups in Kaggle's train split
    split = data.make_split(index, seed=0)
    data.check_split(split)
    assert_no_leak(split)
    assert split.loc[split["sha1"].isin(dup["sha1"])].groupby("sha1")["split"].nunique().max() == 1
    pool = index["label"].mean()
    for name, want in (("val", 0.15), ("test", 0.15)):
        part = split[split["split"] == name]
        assert abs(len(part) / len(split) - want) < 0.02
        assert abs(part["label"].mean() - pool) < 0.05
    # another seed gives another, equally clean split
    other = data.make_split(index, seed=1)
    assert_no_leak(other)
    assert (other["split"] != split["split"]).any()


# ----------------------------------------------------------------------------- cache

def test_cache_round_trip_and_reuse(kaggle_tree, tmp_path, monkeypatch):
    source = listed(kaggle_tree)
    cache = data.build_cache(source, SIZE, cache_root=tmp_path / "cache", workers=1, progress=False)
    n = len(kaggle_tree.labels)
    assert cache.images.shape == (n, SIZE, SIZE) and cache.images.dtype == np.uint8
    assert cache.size == SIZE
    assert list(cache.index["item"]) == list(source.items["item"])
    assert dict(zip(cache.index["item"], cache.index["label"])) == kaggle_tree.labels
    assert cache.dir.parent == tmp_path / "cache"
    for i, item in enumerate(cache.index["item"]):
        raw = kaggle_tree.path(item).read_bytes()
        np.testing.assert_array_equal(cache.images[i], imaging.to_pixels(raw, SIZE).pixels, err_msg=item)
        assert cache.index["sha1"].iat[i] == hashlib.sha1(raw).hexdigest()
    assert (cache.index[["width", "height"]].to_numpy() == [48, 40]).all()
    assert pd.read_csv(cache.dir / "errors.csv").empty

    stamps = {f.name: f.stat().st_mtime_ns for f in cache.dir.iterdir()}

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache was decoded again")

    monkeypatch.setattr(data, "decode_all", no_decoding)
    again = data.build_cache(listed(kaggle_tree), SIZE, cache_root=tmp_path / "cache", workers=1, progress=False)
    assert again.dir == cache.dir
    assert {f.name: f.stat().st_mtime_ns for f in again.dir.iterdir()} == stamps
    np.testing.assert_array_equal(again.images, cache.images)
    pd.testing.assert_frame_equal(again.index, cache.index)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # no stray temporary folders


def test_cache_is_rebuilt_when_content_or_size_changes(kaggle_tree, tmp_path):
    root = tmp_path / "cache"
    first = data.build_cache(listed(kaggle_tree), SIZE, cache_root=root, workers=1, progress=False)
    bigger = data.build_cache(listed(kaggle_tree), 2 * SIZE, cache_root=root, workers=1, progress=False)
    assert bigger.dir != first.dir and bigger.images.shape[1:] == (2 * SIZE, 2 * SIZE)

    item = first.index["item"].iat[0]
    new = np.full((60, 60), 200, np.uint8)
    kaggle_tree.path(item).write_bytes(encode(new, "PNG"))
    rebuilt = data.build_cache(listed(kaggle_tree), SIZE, cache_root=root, workers=1, progress=False)
    assert rebuilt.dir != first.dir
    assert (rebuilt.images[0] == 200).all()
    np.testing.assert_array_equal(rebuilt.images[1:], first.images[1:])


def test_corrupt_file_is_skipped_and_listed(make_kaggle_tree, tmp_path, capsys):
    tree = make_kaggle_tree(corrupt=True)
    source = listed(tree)
    assert tree.corrupt in set(source.items["item"])
    cache = data.build_cache(source, SIZE, cache_root=tmp_path / "cache", workers=1, progress=False)
    assert tree.corrupt not in set(cache.index["item"])
    assert len(cache.index) == len(tree.labels) - 1 == cache.images.shape[0]
    errors = pd.read_csv(cache.dir / "errors.csv")
    assert list(errors["item"]) == [tree.corrupt]
    assert errors["error"].str.contains("truncated|corrupt").all()
    assert tree.corrupt in capsys.readouterr().err
    # remaining rows still line up with their files
    for i in (0, len(cache.index) - 1):
        raw = tree.path(cache.index["item"].iat[i]).read_bytes()
        np.testing.assert_array_equal(cache.images[i], imaging.to_pixels(raw, SIZE).pixels)
    # strict: reusing the cache or building afresh both refuse, naming the file
    with pytest.raises(DataError, match="person999_bacteria_1.jpeg"):
        data.build_cache(source, SIZE, cache_root=tmp_path / "cache", strict=True, workers=1, progress=False)
    with pytest.raises(DataError, match="person999_bacteria_1.jpeg"):
        data.build_cache(source, SIZE, cache_root=tmp_path / "fresh", strict=True, workers=1, progress=False)
    assert not (tmp_path / "fresh").exists() or not any((tmp_path / "fresh").iterdir())


def test_cache_size_is_validated(kaggle_tree, tmp_path):
    with pytest.raises(DataError, match=r"image size must be in 16\.\.1024 \(got 8\)"):
        data.build_cache(listed(kaggle_tree), 8, cache_root=tmp_path, workers=1, progress=False)


def test_cache_of_the_real_original_resolution_sample(shared_data, tmp_path):
    source = data.list_kaggle(str(shared_data / "chest_xray_original_sample"))
    assert len(source.items) == 120
    cache = data.build_cache(source, SIZE, cache_root=tmp_path, workers=1, progress=False)
    assert cache.images.shape == (120, SIZE, SIZE)
    assert (cache.index["width"] != cache.index["height"]).any()
    assert (cache.index[["width", "height"]].to_numpy() > 100).all()
    for i in (0, 77):
        raw = (Path(source.path) / cache.index["item"].iat[i]).read_bytes()
        np.testing.assert_array_equal(cache.images[i], imaging.to_pixels(raw, SIZE).pixels)
    assert cache.images.std() > 10  # real content, not blank


# ----------------------------------------------------------------------------- imaging

def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("transpose", [False, True])
def test_square_resizes_the_short_side_and_centre_crops(transpose):
    img = np.zeros((100, 200), np.uint8)  # 200 wide, 100 tall
    img[:, 50:150] = 255  # white centre, black left/right margins
    if transpose:
        img = img.T.copy()  # portrait: black top/bottom margins
    out = imaging.square(img, 50)
    assert out.shape == (50, 50) and out.dtype == np.uint8
    # squashing would keep the black margins, padding would add black: the crop is all white
    assert out.min() >= 200
    assert (out[2:-2, 2:-2] == 255).all()
    np.testing.assert_array_equal(imaging.to_pixels(png_bytes(img), 50).pixels, out)


def test_square_keeps_an_already_square_image():
    img = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
    np.testing.assert_array_equal(imaging.square(img, 40), img)
    assert imaging.square(img, 20).shape == (20, 20)


def test_16bit_png_is_scaled_to_full_range_not_clipped():
    ramp = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    raw = png_bytes(ramp)
    assert Image.open(io.BytesIO(raw)).mode.startswith("I")
    out = imaging.to_pixels(raw, 64).pixels
    assert out.dtype == np.uint8 and out.shape == (64, 64)
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 200  # clipping to 255 would leave one value
    assert (np.diff(out.ravel().astype(int)) >= 0).all()  # order kept


def test_rgb_is_converted_to_gray():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    rgb[:8] = [255, 0, 0]
    out = imaging.to_pixels(png_bytes(rgb), 48).pixels
    assert out.shape == (48, 48) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(rgb).convert("L")))
    assert (out[:8] == 76).all()  # ITU-R 601 luma of pure red


def test_unusable_bytes_raise_image_error_naming_the_file():
    with pytest.raises(imaging.ImageError, match="a.png.*empty"):
        imaging.to_pixels(b"", 32, "a.png")
    with pytest.raises(imaging.ImageError, match="b.png.*not a readable image"):
        imaging.to_pixels(b"GIF89a garbage", 32, "b.png")
    with pytest.raises(imaging.ImageError, match="c.png.*too small"):
        imaging.to_pixels(png_bytes(np.zeros((8, 40), np.uint8)), 32, "c.png")
    good = encode(np.full((64, 64), 128, np.uint8), "JPEG")
    with pytest.raises(imaging.ImageError, match="(?i)d.jpeg.*truncated"):
        imaging.to_pixels(good[: len(good) // 2], 32, "d.jpeg")


# ----------------------------------------------------------------------------- npz

def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_without_test_split_loads(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    val = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    path = write_npz(tmp_path / "mini.npz", train_images=train, train_labels=np.array([[0], [1]] * 5),
                     val_images=val, val_labels=np.array([1, 0, 1, 1]))
    source = data.list_source("npz", path)
    assert source.items["source_split"].value_counts().to_dict() == {"train": 10, "val": 4}
    assert list(source.items["label"]) == [0, 1] * 5 + [1, 0, 1, 1]
    assert source.items["patient"].nunique() == 14  # no patient ids: one per image
    cache = data.build_cache(source, SIZE, cache_root=tmp_path / "cache", progress=False)
    assert cache.images.shape == (14, SIZE, SIZE)
    np.testing.assert_array_equal(cache.images[0], imaging.square(train[0], SIZE))
    np.testing.assert_array_equal(cache.images[13], imaging.square(val[3], SIZE))
    split = data.make_split(cache.index, seed=0)
    assert set(split["split"]) <= {"train", "val", "test"}


def test_npz_with_only_train_loads(tmp_path):
    path = write_npz(tmp_path / "t.npz", train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.array([0, 1, 1]))
    assert len(data.list_npz(path).items) == 3


@pytest.mark.parametrize("arrays, message", [
    ({"train_images": np.zeros((3, 28, 28), np.uint8), "train_labels": np.array([0, 1, 2])}, "train_labels.*other than 0/1"),
    ({"train_images": np.zeros((3, 28, 28), np.uint8), "train_labels": np.array([0, 1, 1]),
      "val_images": np.zeros((2, 28, 28), np.uint8)}, "val_images but no val_labels"),
    ({"train_images": np.zeros((3, 28, 28), np.uint8), "train_labels": np.array([0, 1])}, "train_images has shape"),
    ({"images": np.zeros((3, 28, 28), np.uint8)}, "no <split>_images"),
])
def test_bad_npz_raises_naming_the_field(tmp_path, arrays, message):
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as e:
        data.list_source("npz", path)
    assert "bad.npz" in str(e.value)


def test_not_an_npz_file_raises(tmp_path):
    path = tmp_path / "x.npz"
    path.write_text("hello")
    with pytest.raises(DataError, match="x.npz.*not a readable .npz"):
        data.list_source("npz", str(path))


def test_real_pneumoniamnist_npz(shared_data, tmp_path):
    path = str(shared_data / "pneumoniamnist_trainval.npz")
    source = data.list_source("npz", path)
    assert source.items["source_split"].value_counts().to_dict() == {"train": 4708, "val": 524}
    assert set(source.items["label"]) == {0, 1}
    cache = data.build_cache(source, SIZE, cache_root=tmp_path, progress=False)
    assert cache.images.shape == (5232, SIZE, SIZE)
    raw = np.load(path)["val_images"][0]
    np.testing.assert_array_equal(cache.images[4708], imaging.square(raw, SIZE))


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_listing_and_render_are_deterministic():
    a, b = synthetic.listing(60, 5), synthetic.listing(60, 5)
    assert a == b and len(a) == 60
    assert synthetic.listing(60, 6) != a
    for it in a[:3]:
        np.testing.assert_array_equal(synthetic.render(it, 5, SIZE), synthetic.render(it, 5, SIZE))
        assert not np.array_equal(synthetic.render(it, 5, SIZE), synthetic.render(it, 6, SIZE))
    img = synthetic.render(a[0], 5, SIZE)
    assert img.shape == (SIZE, SIZE) and img.dtype == np.uint8 and img.std() > 5


def test_synthetic_patients_and_classes():
    items = synthetic.listing(200, 0)
    per_patient = pd.Series([it.patient for it in items]).value_counts()
    assert per_patient.max() >= 2 and per_patient.min() >= 1 and per_patient.max() <= 4
    assert {it.label for it in items} == {0, 1}
    labels = pd.DataFrame([(it.patient, it.label) for it in items], columns=["p", "y"])
    assert (labels.groupby("p")["y"].nunique() == 1).all()
    assert all(data.parse_patient(it.name) == it.patient for it in items)
    # images of one patient differ (pose, noise) but are not identical copies
    p0 = [it for it in items if it.patient == per_patient.index[0]]
    assert not np.array_equal(synthetic.render(p0[0], 0, SIZE), synthetic.render(p0[1], 0, SIZE))


def test_synthetic_metadata_is_per_patient_deterministic_and_labels_only(tmp_path):
    """Sex and age are a patient's, the view an image's, drawn from a stream of their own: the same on
    every call, and the labels and pixels are those of the generator without metadata."""
    items = synthetic.listing(3000, 4)
    assert items == synthetic.listing(3000, 4)
    table = pd.DataFrame([(it.patient, it.label, it.sex, it.age, it.view) for it in items],
                         columns=["patient", "label", "sex", "age", "view"])
    assert (table.groupby("patient")[["sex", "age"]].nunique() == 1).all().all()
    assert set(table["sex"]) == {"F", "M"} and table["age"].between(18, 90).all() and set(table["view"]) == {"AP", "PA"}
    ap = table.groupby("label")["view"].apply(lambda v: (v == "AP").mean())
    assert ap[1] > ap[0]  # as among inpatients: a subgroup table has something to show
    bare = [synthetic.SyntheticItem(it.name, it.patient, it.label, it.patient_index, it.image_index) for it in items[:3]]
    for it, plain in zip(items[:3], bare):  # metadata changes no pixel
        np.testing.assert_array_equal(synthetic.render(it, 4, SIZE), synthetic.render(plain, 4, SIZE))
    source = data.list_source("synthetic", synthetic=synthetic.SyntheticSet(images=30, seed=5, shift=1.0))
    assert set(source.items["site"]) == {"synthetic-5-shift1"} and source.path == "synthetic:5:30:1"
    assert data.metadata_columns(source.items) == ["site", "sex", "age", "view"]
    prepared = data.prepare("synthetic", None, SIZE, tmp_path / "out", synthetic_images=60, cache_root=tmp_path,
                            progress=False)
    written = pd.read_csv(tmp_path / "out" / "split.csv")
    assert {"site", "sex", "age", "view"} <= set(written.columns) and len(written) == 60
    assert prepared.report["composition"]["by"] == ["split", "site"]


def test_synthetic_source_cache_matches_render(tmp_path):
    source = data.list_source("synthetic", synthetic=synthetic.SyntheticSet(images=24, seed=2))
    cache = data.build_cache(source, SIZE, cache_root=tmp_path, workers=1, progress=False)
    items = synthetic.listing(24, 2)
    assert list(cache.index["item"]) == [it.name for it in items]
    for i in (0, 23):
        np.testing.assert_array_equal(cache.images[i], synthetic.render(items[i], 2, SIZE))


# ----------------------------------------------------------------------------- prepare

def test_prepare_writes_split_and_report(make_kaggle_tree, tmp_path):
    tree = make_kaggle_tree(corrupt=True)
    out = tmp_path / "run"
    prepared = data.prepare("kaggle", str(tree.root), SIZE, out, cache_root=tmp_path / "cache", seed=0,
                            val_fraction=0.2, progress=False)
    split = pd.read_csv(out / "split.csv")
    assert {"item", "split", "patient", "label", "sha1"} <= set(split.columns)
    assert set(split["item"]) == set(tree.labels) - {tree.corrupt}
    assert set(split.loc[split["split"] == "test", "item"]) == tree.test_items
    assert set(split.loc[split["split"] == "excluded", "item"]) == tree.excluded
    assert_no_leak(split)
    report = json.loads((out / "data_report.json").read_text())
    assert report["source"] == "kaggle" and report["images"] == len(tree.labels) - 1
    assert report["unparsed_names"] == 3
    assert [c["item"] for c in report["corrupt"]] == [tree.corrupt]
    assert report["duplicates"]["groups"] == 1 and report["duplicates"]["images"] == 2
    assert report["leakage_in_source_splits"]["sha1"]["count"] == 1
    assert report["leakage_in_source_splits"]["patient"]["count"] == 1
    assert report["split"]["test"]["images"] == len(tree.test_items)
    assert report["cache"] == str(prepared.cache.dir)
    assert prepared.cache.dir.parent == tmp_path / "cache"
    # rows index the cache: each split's rows carry that split's items
    for name, rows in prepared.rows.items():
        want = set(split.loc[split["split"] == name, "item"])
        assert set(prepared.cache.index["item"].iloc[rows]) == want
    i = int(prepared.rows["test"][0])
    raw = tree.path(prepared.cache.index["item"].iat[i]).read_bytes()
    np.testing.assert_array_equal(prepared.cache.images[i], imaging.to_pixels(raw, SIZE).pixels)  # pool decode


def test_data_check_shows_the_film_shape_shortcut_of_the_kaggle_train_split(shared_data, tmp_path):
    """On the original-resolution Kaggle images, how wide a film is tells its class; the data report
    says so, since the shared 224 px files squash that shape into the image a model sees."""
    prepared = data.prepare("kaggle", str(shared_data / "chest_xray_original_sample"), SIZE, None,
                            cache_root=tmp_path, progress=False)
    ar = prepared.report["aspect_ratio"]
    assert ar["median_by_class"]["PNEUMONIA"] > ar["median_by_class"]["NORMAL"] and ar["auroc"] > 0.75
    assert "a shortcut a model learns" in data.format_report(prepared.report)


def test_no_shape_cue_without_varying_shapes(kaggle_tree, tmp_path):
    prepared = data.prepare("kaggle", str(kaggle_tree.root), SIZE, None, cache_root=tmp_path, progress=False)
    assert "aspect_ratio" not in prepared.report  # every file 48 x 40: nothing to learn from the shape
