"""Manifests: any labelled collection as a source. Reading and checking tables (every bad case its
one error, before decoding), the patient-level split and pre-assigned splits, metadata flowing to
split.csv and the data report, the cache keyed by images alone, the archive converters against
tables written in each archive's published layout, and a study run end to end from a manifest."""
from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import CLI, encode, synthetic_pixels
from test_data import assert_no_leak
from cxr_ray import archives, cli, data, imaging, manifest, synthetic
from cxr_ray.manifest import ManifestError, ManifestFormat

SIZE = 32


def write_images(folder: Path, n: int = 40, seed: int = 3, fmt: str = "PNG") -> pd.DataFrame:
    """``n`` synthetic films of 1-4 images per patient under ``folder``/images, as a manifest table
    with the default column names, a site and metadata (sex, age, view)."""
    rows = []
    for it in synthetic.listing(n, seed):
        name = f"images/{it.name.removesuffix('.png')}.{'png' if fmt == 'PNG' else 'jpg'}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(encode(synthetic_pixels(it, seed), fmt))
        rows.append({"path": name, "label": it.label, "patient": it.patient, "site": "A", "sex": it.sex,
                     "age": it.age, "view": it.view})
    return pd.DataFrame(rows)


def table_at(folder: Path, table: pd.DataFrame, name: str = "manifest.csv") -> str:
    path = folder / name
    if name.endswith(".parquet"):
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, index=False)
    return str(path)


@pytest.fixture
def images(tmp_path) -> pd.DataFrame:
    return write_images(tmp_path)


# ----------------------------------------------------------------------------- reading

def test_a_manifest_lists_labels_patients_splits_and_metadata(tmp_path, images):
    """Renamed columns, text labels, relative and absolute paths, a pre-assigned split: each as the user wrote it."""
    table = images.rename(columns={"path": "file", "label": "finding", "patient": "subject"})
    table["finding"] = np.where(images["label"] == 1, "Pneumonia", "clear")
    table.loc[0, "file"] = str(tmp_path / table.loc[0, "file"])  # absolute
    table["official"] = np.where(table["subject"] == table["subject"].iat[-1], "test", "")
    path = table_at(tmp_path, table, "labels.parquet")
    fmt = ManifestFormat({"path": "file", "label": "finding", "patient": "subject", "split": "official"},
                         positive=("pneumonia",), negative=("CLEAR",))
    source = data.list_source("manifest", path, manifest=fmt)
    items = source.items
    assert source.kind == "manifest" and list(items["item"]) == list(table["file"])
    assert list(items["label"]) == list(images["label"])  # label values matched without regard to case
    assert list(items["patient"]) == list(images["patient"]) and items["patient_parsed"].all()
    assert set(items.loc[items["source_split"] == "test", "patient"]) == {table["subject"].iat[-1]}
    assert set(items["source_split"]) == {"test", manifest.UNASSIGNED}
    assert list(items["site"]) == ["A"] * len(items) and list(items["sex"]) == list(images["sex"])
    assert items["age"].dtype.kind in "if" and list(items["age"]) == list(images["age"])  # numbers stay numbers
    assert data.metadata_columns(items) == ["site", "sex", "age", "view"]
    assert source.locations[0] == str(tmp_path / images["path"].iat[0])
    assert source.locations[1] == str(tmp_path / images["path"].iat[1])  # relative to the table's folder
    cache = data.build_cache(source, SIZE, tmp_path / "cache", workers=1, progress=False)
    for i in (0, len(items) - 1):
        raw = (tmp_path / images["path"].iat[i]).read_bytes()
        np.testing.assert_array_equal(cache.images[i], imaging.to_pixels(raw, SIZE).pixels)


def test_numeric_labels_and_a_gzipped_csv(tmp_path, images):
    path = tmp_path / "m.csv.gz"
    path.write_bytes(gzip.compress(images.assign(label=images["label"].astype(float)).to_csv(index=False).encode()))
    items = data.list_source("manifest", str(path)).items  # 1.0 / 0.0 read as the default 1 / 0
    assert list(items["label"]) == list(images["label"])


def test_root_and_dicom_paths(tmp_path):
    """Paths relative to --root; DICOM files listed like any image (recognised by content)."""
    from hostile_corpus import dicom
    root = tmp_path / "store"
    rows = []
    for k, it in enumerate(synthetic.listing(6, 2)):
        (root / "dcm").mkdir(parents=True, exist_ok=True)
        (root / "dcm" / f"{k}.dcm").write_bytes(dicom(synthetic_pixels(it, 2).astype(np.uint16) * 200))
        rows.append({"path": f"dcm/{k}.dcm", "label": it.label, "patient": it.patient})
    (tmp_path / "tables").mkdir()
    path = table_at(tmp_path / "tables", pd.DataFrame(rows))
    source = data.list_source("manifest", path, manifest=ManifestFormat(root=str(root)))
    cache = data.build_cache(source, SIZE, tmp_path / "cache", workers=1, progress=False)
    assert cache.images.shape == (6, SIZE, SIZE) and cache.images.std() > 5


BAD = {
    # name: (change the table (and files), error pattern naming the row and the column)
    "missing file": (lambda t, d: t.assign(path=t["path"].where(t.index != 3, "images/gone.png")),
                     r"manifest\.csv line 5, column 'path': images/gone\.png: no such file"),
    "several missing files": (lambda t, d: t.assign(path=t["path"].where(t.index < 30, "images/x" + t.index.astype(str))),
                              r"line 32, column 'path'.*10 of 40 files are missing"),
    "same image, other label": (lambda t, d: pd.concat([t, t.iloc[[2]].assign(label=1 - t["label"].iat[2])]),
                                r"line 42, column 'label': the same image as .*line 4 .*another label"),
    "same image, other patient": (lambda t, d: pd.concat([t, t.iloc[[2]].assign(patient="someone-else")]),
                                  r"line 42, column 'patient': the same image as .*line 4"),
    "patient in two pre-assigned splits": (
        lambda t, d: t.assign(split=np.where(t["patient"] != t["patient"].mode()[0], "",
                                             np.where(t.index == t.index[t["patient"] == t["patient"].mode()[0]][-1],
                                                      "test", "train"))),
        r"line \d+, column 'split': patient 'SYN-S3-P\d+' is pre-assigned to test here and to train at .*line \d+; "
        r"1 patient\(s\) span two pre-assigned splits"),
    "unknown label": (lambda t, d: t.assign(label=t["label"].astype(str).where(t.index != 7, "maybe")),
                      r"line 9, column 'label': label 'maybe' is neither positive \(1, PNEUMONIA\) nor negative"),
    "blank label": (lambda t, d: t.assign(label=t["label"].astype(str).where(t.index != 0, "")),
                    r"line 2, column 'label': label '' is neither positive"),
    "one class only": (lambda t, d: t.assign(label=1), r"manifest\.csv, column 'label': every image is positive"),
    "path escaping the root": (lambda t, d: t.assign(path=t["path"].where(t.index != 1, "../elsewhere/x.png")),
                               r"line 3, column 'path': \.\./elsewhere/x\.png resolves to .*outside the root"),
    "no patient column": (lambda t, d: t.drop(columns="patient"), r"no patient column 'patient'.*patient: image"),
    "patient column blank everywhere": (lambda t, d: t.assign(patient=""), r"column 'patient': blank in every row"),
    "unknown split value": (lambda t, d: t.assign(split=np.where(t.index == 4, "holdout", "")),
                            r"line 6, column 'split': split 'holdout' is not one of train, val, test"),
    "reserved metadata name": (lambda t, d: t.assign(sha1="x"), r"column 'sha1': the name is reserved"),
    "no label column": (lambda t, d: t.drop(columns="label"), r"no label column 'label'"),
    "blank path": (lambda t, d: t.assign(path=t["path"].where(t.index != 6, " ")), r"line 8, column 'path': blank path"),
    "empty table": (lambda t, d: t.iloc[:0], r"the manifest has no rows"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_every_bad_manifest_gets_one_error_naming_row_and_column_before_decoding(tmp_path, images, case,
                                                                                 monkeypatch):
    """Each bad case is refused with its error; no image is decoded first, and a cache built from the
    good table before is left as it was."""
    good = table_at(tmp_path, images)
    fmt = ManifestFormat(root=str(tmp_path))
    before = data.build_cache(data.list_source("manifest", good, manifest=fmt), SIZE, tmp_path / "cache", workers=1,
                              progress=False)
    files = {f: f.read_bytes() for f in before.dir.iterdir()}

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded before the manifest was checked")

    monkeypatch.setattr(data, "decode_all", no_decoding)
    change, pattern = BAD[case]
    table_at(tmp_path, change(images.copy(), tmp_path))
    with pytest.raises(ManifestError, match=pattern) as error:
        data.prepare("manifest", good, SIZE, None, cache_root=tmp_path / "cache", manifest=fmt, progress=False)
    assert "\n" not in str(error.value)  # one line
    assert {f: f.read_bytes() for f in before.dir.iterdir()} == files  # nothing already cached is lost


def test_a_missing_or_unreadable_table_is_named(tmp_path):
    with pytest.raises(ManifestError, match=r"nothing\.csv: no such manifest file"):
        data.list_source("manifest", str(tmp_path / "nothing.csv"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ManifestError, match=r"broken\.parquet: not a readable Parquet table"):
        data.list_source("manifest", str(tmp_path / "broken.parquet"))


def test_a_repeated_row_of_the_same_image_is_listed_once(tmp_path, images):
    path = table_at(tmp_path, pd.concat([images, images.iloc[[5, 6]]], ignore_index=True))
    source = data.list_source("manifest", path)
    assert len(source.items) == len(images) and source.items["item"].is_unique
    assert any("2 repeated row(s)" in n for n in source.notes)


def test_cli_errors_exit_2_with_one_line(tmp_path, images, capsys):
    path = table_at(tmp_path, images.assign(label=images["label"].astype(str).where(images.index != 2, "?")))
    with pytest.raises(SystemExit) as code:
        cli.main(["data", "check", "--source", "manifest", "--path", path, "--size", str(SIZE),
                  "--cache", str(tmp_path / "c")])
    assert code.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "line 4, column 'label'" in err and len(err.splitlines()) == 1


def test_evaluate_and_calibrate_read_a_manifest_as_the_command_line_says():
    """--source manifest with --column, --positive, --negative and --root reach the labelled set."""
    args = cli.build_parser().parse_args(
        ["calibrate", "/s", "--name", "siteB", "--source", "manifest", "--path", "b.parquet", "--split", "test",
         "--column", "label=Target", "--column", "patient=image", "--positive", "yes", "--negative", "no",
         "--root", "/imgs"])
    ext = cli._labelled_set(args, "siteB")
    assert (ext.source, ext.path, ext.split) == ("manifest", "b.parquet", "test")
    assert ext.manifest_format == ManifestFormat({"label": "Target", "patient": "image"}, ("yes",), ("no",), "/imgs")
    plain = cli.build_parser().parse_args(["evaluate", "/s", "--external", "b=b.csv", "--source", "manifest"])
    plain.path = "b.csv"  # as cmd_evaluate takes it from --external
    assert cli._labelled_set(plain, "b").manifest_format == ManifestFormat()
    with pytest.raises(SystemExit) as code:
        cli.main(["data", "check", "--source", "manifest", "--path", "x.csv", "--column", "label"])
    assert code.value.code == 2


# ----------------------------------------------------------------------------- patients and splits

def test_the_patient_level_split_holds_for_manifests(tmp_path):
    """Patients with several images, and one image copied under another name for another patient:
    no patient and no image's bytes on two sides, for several seeds."""
    table = write_images(tmp_path, n=240, seed=4)
    copy = tmp_path / "images" / "copy.png"
    copy.write_bytes((tmp_path / table["path"].iat[0]).read_bytes())
    table = pd.concat([table, pd.DataFrame([{**table.iloc[0].to_dict(), "path": "images/copy.png",
                                             "patient": "another"}])], ignore_index=True)
    assert table.groupby("patient").size().max() >= 3
    for seed in range(3):
        prepared = data.prepare("manifest", table_at(tmp_path, table), SIZE, None, seed=seed,
                                cache_root=tmp_path / "cache", progress=False)
        split = prepared.split
        assert set(split["split"]) == {"train", "val", "test"}
        assert_no_leak(split)
        data.check_split(split)


def test_pre_assigned_splits_are_respected(tmp_path):
    """Rows with a split stay there; blank ones are carved (val here, since test is given); a blank row
    of a test patient is excluded, a blank row of a train patient joins train."""
    table = write_images(tmp_path, n=200, seed=6)
    patients = list(dict.fromkeys(table["patient"]))
    test_p, train_p = patients[:12], patients[12:40]
    table["split"] = np.where(table["patient"].isin(test_p), "test", np.where(table["patient"].isin(train_p), "train", ""))
    stray_test = table.index[table["patient"] == next(p for p in test_p if (table["patient"] == p).sum() > 1)][-1]
    stray_train = table.index[table["patient"] == next(p for p in train_p if (table["patient"] == p).sum() > 1)][-1]
    table.loc[[stray_test, stray_train], "split"] = ""
    prepared = data.prepare("manifest", table_at(tmp_path, table), SIZE, None, cache_root=tmp_path / "cache",
                            val_fraction=0.2, progress=False)
    split = prepared.split.set_index("item")
    given = table.set_index("path")["split"]
    for name in ("test", "train"):
        assert (split.loc[given.index[given == name], "split"] == name).all()
    assert split.at[table.at[stray_test, "path"], "split"] == "excluded"
    assert "pre-assigned test" in split.at[table.at[stray_test, "path"], "reason"]
    assert split.at[table.at[stray_train, "path"], "split"] == "train"
    carved = split[given.reindex(split.index).eq("").to_numpy()]
    assert set(carved["split"]) - {"excluded"} == {"train", "val"}  # test was given: only val is carved
    assert_no_leak(prepared.split)
    # use_official_test: false ignores the pre-assignment and carves every split
    free = data.prepare("manifest", table_at(tmp_path, table), SIZE, None, cache_root=tmp_path / "cache",
                        use_official_test=False, progress=False).split
    assert "excluded" not in set(free["split"]) and not (free.set_index("item").loc[given.index[given == "test"],
                                                                                   "split"] == "test").all()


def test_a_pre_assigned_test_split_of_one_class_is_refused_before_decoding(tmp_path, images, monkeypatch):
    table = images.assign(split=np.where((images["label"] == 1) & (images.index < 10), "test", ""))
    monkeypatch.setattr(data, "decode_all", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
    with pytest.raises(data.DataError, match=r"pre-assigned test split holds \d+ image\(s\), all PNEUMONIA"):
        data.prepare("manifest", table_at(tmp_path, table), SIZE, None, cache_root=tmp_path / "c", progress=False)


def test_patient_image_is_an_image_level_split_said_out_loud(tmp_path, images):
    path = table_at(tmp_path, images.drop(columns="patient"))
    prepared = data.prepare("manifest", path, SIZE, None, cache_root=tmp_path / "c", progress=False,
                            manifest=ManifestFormat({"patient": "image"}))
    assert prepared.report["split_level"] == "image"
    assert prepared.split["patient"].is_unique  # every image its own patient
    assert "IMAGE-LEVEL" in data.format_report(prepared.report)
    kept = data.prepare("manifest", table_at(tmp_path, images), SIZE, None, cache_root=tmp_path / "c", progress=False)
    assert kept.report["split_level"] == "patient"


def test_the_report_states_an_image_level_split_and_why_it_can_leak(fake_study_dir, tmp_path):
    import re
    import shutil

    from cxr_ray import report
    sdir = tmp_path / "study"
    shutil.copytree(fake_study_dir, sdir)
    facts = json.loads((sdir / "data_report.json").read_text())
    (sdir / "data_report.json").write_text(json.dumps(facts | {"split_level": "image"}))
    html = Path(report.write(str(sdir))).read_text()
    audit = html.split("<h2>Fairness audit</h2>", 1)[1].split("<h2>", 1)[0]
    warned = " ".join(re.findall(r"<div class='warn'>(.*?)</div>", audit, re.S))
    assert "IMAGE-LEVEL SPLIT" in warned and "training and in test" in warned
    (sdir / "data_report.json").write_text(json.dumps(facts | {"split_level": "patient",
                                                               "images_without_patient_id": 7}))
    html = Path(report.write(str(sdir))).read_text()
    assert "IMAGE-LEVEL" not in html and "7 image(s) have no patient id" in html


# ----------------------------------------------------------------------------- metadata and the cache

def test_metadata_reaches_split_csv_and_the_data_report(tmp_path, images):
    out = tmp_path / "prepared"
    table = images.assign(site=np.where(images.index % 2, "A", "B"))
    data.prepare("manifest", table_at(tmp_path, table), SIZE, out, cache_root=tmp_path / "c", progress=False)
    split = pd.read_csv(out / "split.csv")
    assert {"site", "sex", "age", "view"} <= set(split.columns)
    by_item = split.set_index("item")
    for row in table.itertuples():
        assert (by_item.at[row.path, "sex"], by_item.at[row.path, "age"], by_item.at[row.path, "view"],
                by_item.at[row.path, "site"]) == (row.sex, row.age, row.view, row.site)
    report = json.loads((out / "data_report.json").read_text())
    groups = report["composition"]["groups"]
    assert report["composition"]["by"] == ["split", "site"]
    # counts per split and site add up, by label and by each categorical column's values
    for g in groups:
        mine = split[(split["split"] == g["split"]) & (split["site"] == g["site"])]
        assert g["classes"] == {"NORMAL": int((mine["label"] == 0).sum()), "PNEUMONIA": int((mine["label"] == 1).sum())}
        assert {v: c["NORMAL"] + c["PNEUMONIA"] for v, c in g["columns"]["sex"].items()} == \
            mine["sex"].value_counts().to_dict()
        assert g["columns"]["age"]["median"] == pytest.approx(mine["age"].median())
    assert sum(sum(g["classes"].values()) for g in groups) == len(split)
    text = data.format_report(report)
    assert "by split and site" in text and "sex" in text and "median" in text


def test_the_cache_is_keyed_by_the_images_not_the_labels(tmp_path, images, monkeypatch):
    """Correcting a label or adding a column decodes nothing again; the cache index carries the new
    values. Changing an image's bytes does decode again."""
    path = table_at(tmp_path, images)
    first = data.build_cache(data.list_source("manifest", path), SIZE, tmp_path / "c", workers=1, progress=False)
    fixed = images.assign(label=images["label"].where(images.index != 0, 1 - images["label"].iat[0]), device="X1")
    table_at(tmp_path, fixed)
    with monkeypatch.context() as m:
        m.setattr(data, "decode_all", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded again")))
        again = data.build_cache(data.list_source("manifest", path), SIZE, tmp_path / "c", workers=1, progress=False)
    assert again.dir == first.dir
    assert again.index["label"].iat[0] == fixed["label"].iat[0] and (again.index["device"] == "X1").all()
    (tmp_path / images["path"].iat[0]).write_bytes(encode(np.full((40, 48), 90, np.uint8), "PNG"))
    changed = data.build_cache(data.list_source("manifest", path), SIZE, tmp_path / "c", workers=1, progress=False)
    assert changed.dir != first.dir and (changed.images[0] == 90).all()


def test_unreadable_images_are_dropped_from_the_memory_mapped_cache(tmp_path, images):
    bad = tmp_path / images["path"].iat[4]
    bad.write_bytes(bad.read_bytes()[:60])
    cache = data.build_cache(data.list_source("manifest", table_at(tmp_path, images)), SIZE, tmp_path / "c",
                             workers=1, progress=False)
    assert len(cache.index) == len(images) - 1 == cache.images.shape[0]
    assert images["path"].iat[4] not in set(cache.index["item"])
    assert isinstance(cache.images, np.memmap)
    for i, item in enumerate(cache.index["item"]):
        np.testing.assert_array_equal(cache.images[i], imaging.to_pixels((tmp_path / item).read_bytes(), SIZE).pixels)
    assert sorted(f.name for f in cache.dir.iterdir()) == ["errors.csv", "images.npy", "index.csv", "source.json"]


def test_published_images_map_back_from_a_shared_folder(tmp_path, images):
    cache = data.build_cache(data.list_source("manifest", table_at(tmp_path, images)), SIZE, tmp_path / "c",
                             workers=1, progress=False)
    where = data.publish_images(cache, str(tmp_path / "shared"))
    assert where.startswith(str(tmp_path / "shared")) and data.publish_images(cache, str(tmp_path / "shared")) == where
    mapped = data.map_images(where)
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, cache.images)


def test_a_manifest_and_its_images_on_s3(tmp_path, images, monkeypatch):
    """Table and images in a bucket (a moto server on 127.0.0.1): listed, checked, decoded; a cache
    published there maps back on a node through one download."""
    import moto.server as moto_server
    import pyarrow.fs as pafs

    from cxr_ray import runtime, storage
    port = runtime.free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(key, value)
        pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", allow_bucket_creation=True).create_dir("cxr")
        for p in images["path"]:
            storage.write_bytes(f"s3://cxr/site/{p}", (tmp_path / p).read_bytes())
        storage.write_csv("s3://cxr/site/manifest.csv", images)
        source = data.list_source("manifest", "s3://cxr/site/manifest.csv")
        assert source.locations[0] == f"s3://cxr/site/{images['path'].iat[0]}"
        cache = data.build_cache(source, SIZE, tmp_path / "c", workers=1, progress=False)
        local = data.build_cache(data.list_source("manifest", table_at(tmp_path, images)), SIZE, tmp_path / "c",
                                 workers=1, progress=False)
        np.testing.assert_array_equal(cache.images, local.images)
        storage.write_csv("s3://cxr/site/gone.csv", images.assign(path=images["path"].where(images.index != 2, "x.png")))
        with pytest.raises(ManifestError, match=r"gone\.csv line 4, column 'path': x\.png: no such file"):
            data.list_source("manifest", "s3://cxr/site/gone.csv")
        where = data.publish_images(cache, "s3://cxr/studies/one/cache")
        monkeypatch.setenv("CXR_RAY_CACHE", str(tmp_path / "node"))
        np.testing.assert_array_equal(data.map_images(where), cache.images)
    finally:
        server.stop()


# ----------------------------------------------------------------------------- converters

def png(path: Path, it: synthetic.SyntheticItem, seed: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(synthetic_pixels(it, seed), "PNG" if path.suffix == ".png" else "JPEG"))


def load(out: Path, **fmt) -> pd.DataFrame:
    """The converter's manifest read back as a source (so it is a valid manifest), keyed by item, after
    decoding every image it lists into the cache, as a study's data stage does (PNG, JPEG, DICOM)."""
    source = data.list_source("manifest", str(out), manifest=ManifestFormat(**fmt))
    cache = data.build_cache(source, SIZE, out.parent / "cache", progress=False)
    assert list(cache.index["item"]) == list(source.items["item"]) and cache.images.shape[1:] == (SIZE, SIZE)
    return source.items.set_index("item")


def test_nih_chestxray14(tmp_path):
    root = tmp_path / "nih"
    its = synthetic.listing(8, 5)
    rows = [  # Data_Entry_2017_v2020.csv's columns, as published
        ("00000001_000.png", "Cardiomegaly|Pneumonia", 0, 1, 58, "M", "PA"),
        ("00000001_001.png", "No Finding", 1, 1, 58, "M", "PA"),
        ("00000002_000.png", "Effusion|Infiltration", 0, 2, 81, "F", "AP"),
        ("00000003_000.png", "Pneumonia", 0, 3, 414, "F", "AP"),  # an implausible age, as in the real table
        ("00000004_000.png", "No Finding", 0, 4, 33, "M", "PA"),
        ("00000005_000.png", "No Finding", 0, 5, 47, "F", "PA"),  # listed, image not downloaded
    ]
    table = pd.DataFrame([{"Image Index": r[0], "Finding Labels": r[1], "Follow-up #": r[2], "Patient ID": r[3],
                           "Patient Age": r[4], "Patient Gender": r[5], "View Position": r[6],
                           "OriginalImage[Width": 2500, "Height]": 2048, "OriginalImagePixelSpacing[x": 0.143,
                           "y]": 0.143} for r in rows])
    root.mkdir()
    table.to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    (root / "test_list.txt").write_text("00000004_000.png\n")
    (root / "train_val_list.txt").write_text("\n".join(r[0] for r in rows if r[3] != 4) + "\n")
    for k, r in enumerate(rows[:5]):
        png(root / f"images_00{1 + k % 2}" / "images" / r[0], its[k])
    out = tmp_path / "nih.csv"
    info = archives.convert("nih", str(root), str(out))
    got = load(out)
    assert dict(zip(got.index.str.rsplit("/", n=1).str[-1], got["label"])) == {
        "00000001_000.png": 1, "00000001_001.png": 0, "00000002_000.png": 0, "00000003_000.png": 1,
        "00000004_000.png": 0}
    first = got.loc[got.index.str.endswith("00000001_000.png")].iloc[0]
    assert (first["patient"], first["sex"], first["age"], first["view"], first["site"]) == ("1", "M", 58, "PA", "nih")
    assert pd.isna(got.loc[got.index.str.endswith("00000003_000.png"), "age"].iat[0])
    assert list(got.loc[got["source_split"] == "test"].index.str.rsplit("/", n=1).str[-1]) == ["00000004_000.png"]
    assert info["counts"]["images_not_found"] == 1 and info["counts"]["implausible_ages_blanked"] == 1
    assert info["converter"] == "nih" and str(root / "Data_Entry_2017_v2020.csv") in info["files"]
    assert json.loads((tmp_path / "nih.csv.json").read_text()) == json.loads(json.dumps(info, default=str))
    assert not got.index.str.startswith("/").any()  # under the manifest's folder: relative paths


def test_rsna_pneumonia_detection_with_dicom_headers(tmp_path):
    from hostile_corpus import dicom
    root = tmp_path / "rsna"
    (root / "stage_2_train_images").mkdir(parents=True)
    ids = ["0004cfab-14fd", "00313ee0-9eaa", "00322d4d-1c29", "003d8fa0-6bf1"]
    labels = pd.DataFrame([  # stage_2_train_labels.csv: a row per box; negatives have one row with no box
        (ids[0], "", "", "", "", 0), (ids[1], 264.0, 152.0, 213.0, 379.0, 1), (ids[1], 562.0, 152.0, 256.0, 453.0, 1),
        (ids[2], "", "", "", "", 0), (ids[3], 316.0, 318.0, 170.0, 478.0, 1)],
        columns=["patientId", "x", "y", "width", "height", "Target"])
    labels.to_csv(root / "stage_2_train_labels.csv", index=False)
    pd.DataFrame({"patientId": [r[0] for r in labels.itertuples(index=False)],
                  "class": ["Normal", "Lung Opacity", "Lung Opacity", "No Lung Opacity / Not Normal", "Lung Opacity"]}
                 ).to_csv(root / "stage_2_detailed_class_info.csv", index=False)
    headers = [("F", "051Y", "PA"), ("M", "048Y", "AP"), ("F", "019Y", "PA"), ("M", "077Y", "AP")]
    for k, (pid, (sex, age, view)) in enumerate(zip(ids, headers)):
        pixels = synthetic_pixels(synthetic.listing(4, 8)[k], 8).astype(np.uint16) * 64
        (root / "stage_2_train_images" / f"{pid}.dcm").write_bytes(
            dicom(pixels, PatientSex=sex, PatientAge=age, ViewPosition=view, PatientID=pid))
    out = tmp_path / "out" / "rsna.parquet"
    out.parent.mkdir()
    info = archives.convert("rsna", str(root), str(out))
    got = load(out)
    by_id = {Path(i).stem: row for i, row in got.iterrows()}
    assert {k: r["label"] for k, r in by_id.items()} == {ids[0]: 0, ids[1]: 1, ids[2]: 0, ids[3]: 1}
    assert by_id[ids[1]]["boxes"] == 2 and by_id[ids[2]]["rsna_class"] == "No Lung Opacity / Not Normal"
    assert [(by_id[i]["sex"], by_id[i]["age"], by_id[i]["view"]) for i in ids] == [(s, int(a[:3]), v)
                                                                                     for s, a, v in headers]
    assert (got["patient"] == got.index.map(lambda i: Path(i).stem)).all()
    assert any("one image" in n for n in info["notes"])
    cache = data.build_cache(data.list_source("manifest", str(out)), SIZE, tmp_path / "c", workers=1, progress=False)
    assert cache.images.shape == (4, SIZE, SIZE)  # the DICOMs decode


CHEXPERT_OBSERVATIONS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                         "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                         "Pleural Other", "Fracture", "Support Devices"]


def write_chexpert(tmp_path: Path) -> Path:
    """CheXpert-v1.0-small: train.csv with each Pneumonia code, valid.csv (0/1 only), JPEG images."""
    root = tmp_path / "CheXpert-v1.0-small"
    train = [  # (patient, study, view, Sex, Age, Frontal/Lateral, AP/PA, Pneumonia)
        (1, 1, "view1_frontal", "Female", 68, "Frontal", "AP", "1.0"),
        (1, 1, "view2_lateral", "Female", 68, "Lateral", "", "1.0"),
        (2, 1, "view1_frontal", "Male", 87, "Frontal", "PA", "0.0"),
        (3, 1, "view1_frontal", "Male", 41, "Frontal", "AP", "-1.0"),
        (3, 2, "view1_frontal", "Male", 41, "Frontal", "AP", ""),
        (4, 1, "view1_frontal", "Unknown", 55, "Frontal", "PA", "1.0"),
    ]
    valid = [(64541, 1, "view1_frontal", "Male", 73, "Frontal", "AP", "0.0"),
             (64542, 1, "view1_frontal", "Female", 70, "Frontal", "PA", "1.0")]
    its = iter(synthetic.listing(12, 9))
    for name, rows in (("train", train), ("valid", valid)):
        records = []
        for p, st, view, sex, age, fl, appa, pneumonia in rows:
            rel = f"CheXpert-v1.0-small/{name}/patient{p:05d}/study{st}/{view}.jpg"
            png(tmp_path / rel, next(its))
            obs = dict.fromkeys(CHEXPERT_OBSERVATIONS, "") | {"Pneumonia": pneumonia, "Support Devices": "1.0"}
            records.append({"Path": rel, "Sex": sex, "Age": age, "Frontal/Lateral": fl, "AP/PA": appa, **obs})
        pd.DataFrame(records).to_csv(root / f"{name}.csv", index=False)
    return root


@pytest.mark.parametrize("policy, uncertain_label", [("exclude", None), ("positive", 1), ("negative", 0)])
def test_chexpert_with_each_uncertain_policy(tmp_path, policy, uncertain_label):
    root = write_chexpert(tmp_path)
    out = tmp_path / "chexpert.csv"
    info = archives.convert("chexpert", str(root), str(out), uncertain=policy)
    got = load(out)
    uncertain = "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg"
    if uncertain_label is None:
        assert not got.index.str.endswith(uncertain).any() and info["counts"]["uncertain_left_out"] == 1
    else:
        assert got.loc[got.index.str.endswith(uncertain), "label"].iat[0] == uncertain_label
    blank = got.loc[got.index.str.endswith("patient00003/study2/view1_frontal.jpg")].iloc[0]
    assert blank["label"] == 0  # not mentioned: negative
    assert info["uncertain"] == policy and "negative" in info["blank"]
    assert info["counts"]["train.csv"] == {"positive": 3, "negative": 1, "uncertain": 1, "blank_read_as_negative": 1}
    assert set(got.loc[got["source_split"] == "test", "patient"]) == {"patient64541", "patient64542"}
    lateral = got.loc[got.index.str.endswith("view2_lateral.jpg")].iloc[0]
    assert (lateral["patient"], lateral["view"], lateral["sex"], lateral["age"]) == ("patient00001", "LATERAL", "F", 68)
    assert got.loc[got.index.str.contains("patient00004"), "sex"].isna().all() or \
        (got.loc[got.index.str.contains("patient00004"), "sex"].fillna("") == "").all()
    source = data.list_source("manifest", str(out))
    assert any(f"uncertain labels: {policy}" in n for n in source.notes)  # the sidecar's policy reaches the report


def test_chexpert_views_filter_and_cli(tmp_path, capsys):
    root = write_chexpert(tmp_path)
    out = tmp_path / "frontal.csv"
    cli.main(["data", "manifest", "--from", "chexpert", str(root), "-o", str(out), "--views", "PA,AP",
              "--uncertain", "negative"])
    printed = capsys.readouterr().out
    assert f"{out}: 7 images" in printed and "only views AP, PA kept (1 image(s)" in printed
    assert set(load(out)["view"]) == {"AP", "PA"}
    cli.main(["data", "check", "--source", "manifest", "--path", str(out), "--size", str(SIZE),
              "--cache", str(tmp_path / "c")])
    report = capsys.readouterr().out
    assert "by split and site" in report and "view" in report and "converted by `cxr-ray data manifest" in report


def write_mimic(root: Path) -> None:
    """MIMIC-CXR-JPG 2.0.0's three tables (gzipped, as PhysioNet ships them), MIMIC-IV's patients.csv, images."""
    observations = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                    "Pneumonia", "Pneumothorax", "Support Devices"]
    studies = [(10000032, 50414267, "1.0"), (10000032, 53189527, "-1.0"), (10000764, 57375967, ""),
               (10000898, 50771383, "0.0"), (10001217, 52067803, "1.0")]
    chexpert = pd.DataFrame([{"subject_id": s, "study_id": st, **dict.fromkeys(observations, ""), "Pneumonia": p}
                             for s, st, p in studies])
    images = [("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", 10000032, 50414267, "PA"),
              ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", 10000032, 50414267, "LATERAL"),
              ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", 10000032, 53189527, "AP"),
              ("096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", 10000764, 57375967, "AP"),
              ("0c4eb1e1-b801903c-bcebe8a4-3da9cd3c-3b94a27c", 10000898, 50771383, "PA"),
              ("4b1a9c2f-53c0e3d1-7f5c25d3-dd8a2d6e-6f0a1e9b", 10001217, 52067803, "PA"),
              ("5c8e2a91-2bb5d0f4-0c7e3f1a-8d21b6e0-1d4a7c3e", 10001884, 55555555, "PA")]  # a study with no label row
    metadata = pd.DataFrame([{"dicom_id": d, "subject_id": s, "study_id": st, "PerformedProcedureStepDescription":
                              "CHEST (PA AND LAT)", "ViewPosition": v, "Rows": 3056, "Columns": 2544,
                              "StudyDate": 21800506, "StudyTime": 213014.531, "ProcedureCodeSequence_CodeMeaning":
                              "CHEST (PA AND LAT)", "ViewCodeSequence_CodeMeaning": "postero-anterior",
                              "PatientOrientationCodeSequence_CodeMeaning": "Erect"} for d, s, st, v in images])
    split = pd.DataFrame([{"dicom_id": d, "study_id": st, "subject_id": s,
                           "split": {10000032: "train", 10000764: "validate", 10000898: "test"}.get(s, "train")}
                          for d, s, st, v in images])
    patients = pd.DataFrame({"subject_id": [10000032, 10000764, 10000898, 10001217], "gender": ["F", "M", "F", "F"],
                             "anchor_age": [52, 86, 80, 55], "anchor_year": [2180, 2132, 2187, 2157],
                             "anchor_year_group": ["2014 - 2016"] * 4, "dod": ["", "", "", ""]})
    root.mkdir(parents=True)
    for name, table in (("mimic-cxr-2.0.0-chexpert.csv.gz", chexpert), ("mimic-cxr-2.0.0-metadata.csv.gz", metadata),
                        ("mimic-cxr-2.0.0-split.csv.gz", split)):
        table.to_csv(root / name, index=False)
    (root / "hosp").mkdir()
    patients.to_csv(root / "hosp" / "patients.csv.gz", index=False)
    for k, (d, s, st, v) in enumerate(images[:-1]):
        png(root / "files" / f"p{str(s)[:2]}" / f"p{s}" / f"s{st}" / f"{d}.jpg", synthetic.listing(8, 12)[k])


def test_mimic_cxr_jpg(tmp_path):
    root = tmp_path / "mimic-cxr-jpg" / "2.0.0"
    write_mimic(root)
    out = tmp_path / "mimic.csv"
    info = archives.convert("mimic", str(root), str(out), uncertain="exclude")
    got = load(out)
    by_dicom = {Path(i).stem: row for i, row in got.iterrows()}
    assert {d[:8]: r["label"] for d, r in by_dicom.items()} == {
        "02aa804e": 1, "174413ec": 1, "096052b7": 0, "0c4eb1e1": 0, "4b1a9c2f": 1}  # -1.0 left out, blank negative
    pa = by_dicom["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"]
    assert (pa["patient"], pa["study"], pa["view"], pa["sex"], pa["age"]) == ("10000032", 50414267, "PA", "F", 52)
    assert got.index[0].endswith("files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg")
    assert {d[:8]: r["source_split"] for d, r in by_dicom.items()} == {
        "02aa804e": "train", "174413ec": "train", "096052b7": "val", "0c4eb1e1": "test", "4b1a9c2f": "train"}
    assert info["counts"]["images_of_unlabelled_studies"] == 1 and info["counts"]["uncertain_left_out"] == 1
    # per image: the two images of study 50414267 carry its label
    assert info["counts"]["Pneumonia"] == {"positive": 3, "negative": 1, "uncertain": 1, "blank_read_as_negative": 1}


def test_folders_and_the_kaggle_layout(kaggle_tree, tmp_path):
    """The folders converter writes what the kaggle source lists: same labels, the official test split,
    Kaggle patient ids, blank where a name has none; its manifest splits like the kaggle source."""
    out = tmp_path / "kaggle.csv"
    archives.convert("folders", str(kaggle_tree.root), str(out))
    got = load(out)
    kaggle = data.list_source("kaggle", str(kaggle_tree.root)).items.set_index("item")
    assert len(got) == len(kaggle)
    item = {str(Path(i).relative_to(Path(kaggle_tree.layout).relative_to(tmp_path))) if not Path(i).is_absolute()
            else str(Path(i).relative_to(kaggle_tree.layout)): i for i in got.index}
    assert {k: got.at[v, "label"] for k, v in item.items()} == dict(zip(kaggle.index, kaggle["label"]))
    assert {k for k, v in item.items() if got.at[v, "source_split"] == "test"} == kaggle_tree.test_items
    assert {k for k, v in item.items() if not got.at[v, "patient_parsed"]} == kaggle_tree.unparsed
    split = data.prepare("manifest", str(out), SIZE, None, cache_root=tmp_path / "c", progress=False).split
    split["item"] = split["item"].map({v: k for k, v in item.items()})
    assert set(split.loc[split["split"] == "test", "item"]) == kaggle_tree.test_items
    assert set(split.loc[split["split"] == "excluded", "item"]) == kaggle_tree.excluded
    assert_no_leak(split)


@pytest.mark.parametrize("archive, needs", [("nih", "Data_Entry_2017"), ("rsna", "stage_2_train_labels.csv"),
                                            ("chexpert", "train.csv or valid.csv"), ("mimic", "chexpert.csv")])
def test_a_converter_names_the_label_file_it_misses(tmp_path, archive, needs):
    with pytest.raises(archives.ArchiveError, match=needs):
        archives.convert(archive, str(tmp_path), str(tmp_path / "m.csv"))


def test_a_converter_names_a_missing_column(tmp_path):
    root = write_chexpert(tmp_path)
    pd.read_csv(root / "train.csv").drop(columns="Pneumonia").to_csv(root / "train.csv", index=False)
    with pytest.raises(archives.ArchiveError, match=r"train\.csv: no column 'Pneumonia'"):
        archives.convert("chexpert", str(root), str(tmp_path / "m.csv"))


def test_data_synthetic_writes_a_site_a_manifest_reads_back_exactly(tmp_path, capsys, monkeypatch):
    """`cxr-ray data synthetic` (how `make demo` makes the quickstart's external site, into a relative
    folder): PNG files whose pixels are the drawings, and a manifest whose labels, patients and metadata
    are the drawings' own."""
    monkeypatch.chdir(tmp_path)
    cli.main(["data", "synthetic", "site", "--images", "30", "--seed", "4", "--shift", "0.5", "--size", "40"])
    assert "30 SYNTHETIC images (not medical data)" in capsys.readouterr().out
    source = data.list_source("manifest", str(tmp_path / "site" / "manifest.csv"))
    drawn = synthetic.SyntheticSet(30, 4, 0.5)
    items = synthetic.listing(30, 4)
    got = source.items
    assert list(got["label"]) == [it.label for it in items] and list(got["patient"]) == [it.patient for it in items]
    assert list(got["sex"]) == [it.sex for it in items] and list(got["age"]) == [it.age for it in items]
    assert list(got["view"]) == [it.view for it in items] and set(got["site"]) == {drawn.site}
    for i in (0, 29):
        decoded = imaging.to_pixels((tmp_path / "site" / got["item"].iat[i]).read_bytes(), 40)
        assert np.array_equal(decoded.pixels, synthetic.render(items[i], 4, 40, 0.5))
    assert any("written by `cxr-ray data synthetic --images 30 --seed 4 --shift 0.5 --size 40`" in n
               for n in source.notes)


@pytest.mark.parametrize("args, says", [(["--images", "0"], "synthetic images must be >= 1 (got 0)"),
                                        (["--shift", "-1"], "synthetic shift must be >= 0 (got -1)"),
                                        (["--size", "0"], "the written images' size must be in")])
def test_data_synthetic_refuses_what_it_cannot_draw_in_one_line(tmp_path, capsys, args, says):
    with pytest.raises(SystemExit) as code:
        cli.main(["data", "synthetic", str(tmp_path / "site")] + args)
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and err.startswith(f"error: {says}") and len(err.splitlines()) == 1
    assert not (tmp_path / "site" / "manifest.csv").exists()


# ----------------------------------------------------------------------------- a study from manifests

STUDY = """
name: from_manifest
seed: 0
data: {{source: manifest, path: {train}, image_size: 32, columns: {{label: finding, patient: subject}},
        positive: [pneumonia], negative: [normal]}}
arms: [lcnet_050]
search_space:
  lr: {{loguniform: [2e-3, 1e-2]}}
fixed: {{batch_size: 32}}
budget: {{samples_per_arm: 2, max_epochs: 2, grace_period: 2}}
resources: {{workers_per_trial: 1, cpus_per_worker: 1, max_concurrent_trials: 2}}
final: {{seeds: [0], bootstrap: 100}}
subgroups: [sex, view, age_band]
subgroup_min: 10
external:
  - {{name: siteB, source: manifest, path: {external}}}
"""


@pytest.mark.e2e
def test_a_study_runs_end_to_end_from_manifests_with_the_cache_memory_mapped(tmp_path, study_env):
    """Synthetic PNGs listed by a manifest (metadata, a pre-assigned test split) train a tiny study whose
    external set is the manifest `cxr-ray data synthetic` writes (as the quickstart's site is made), with
    subgroups scored from its metadata columns. The shipping limit is set to 0, so every trial
    memory-maps the cache file instead of receiving the array through the object store."""
    site_a = write_images(tmp_path / "a", n=300, seed=0)
    patients = list(dict.fromkeys(site_a["patient"]))
    site_a["split"] = np.where(site_a["patient"].isin(patients[-20:]), "test", "")
    site_a = site_a.rename(columns={"label": "finding", "patient": "subject"})
    site_a["finding"] = np.where(site_a["finding"] == 1, "pneumonia", "normal")
    subprocess.run(CLI + ["data", "synthetic", str(tmp_path / "b"), "--images", "120", "--size", "40"], check=True,
                   capture_output=True)
    spec = tmp_path / "study.yaml"
    spec.write_text(STUDY.format(train=table_at(tmp_path / "a", site_a), external=tmp_path / "b" / "manifest.csv"))
    run = subprocess.run(CLI + ["study", "run", str(spec), "--out", str(tmp_path / "study")],
                         env=study_env | {"CXR_RAY_SHIP_LIMIT_MB": "0"}, capture_output=True, text=True, timeout=900,
                         start_new_session=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "every worker memory-maps" in run.stdout
    sdir = tmp_path / "study"
    split = pd.read_csv(sdir / "split.csv")
    assert_no_leak(split)
    given = site_a.set_index("path")["split"]
    assert set(split.loc[split["split"] == "test", "item"]) == set(given.index[given == "test"])
    assert {"site", "sex", "age", "view"} <= set(split.columns)
    # what evaluation scored joins to its metadata from the study directory alone
    predictions = pd.read_csv(sdir / "predictions.csv")
    test = predictions.merge(split, on="item", suffixes=("", "_split"))
    assert len(test) == len(predictions) and set(test["split"]) == {"test"} and test["sex"].notna().all()
    ext = pd.read_csv(sdir / "external" / "siteB" / "index.csv")
    assert {"site", "sex", "age", "view", "same_bytes", "shared_patient"} <= set(ext.columns)
    scored = pd.read_csv(sdir / "external" / "siteB" / "predictions.csv").merge(ext, on="item")
    assert len(scored) == len(pd.read_csv(sdir / "external" / "siteB" / "predictions.csv"))
    assert set(scored["site"]) == {"synthetic-5-shift1"}
    report = json.loads((sdir / "data_report.json").read_text())
    assert report["source"] == "manifest" and report["split_level"] == "patient"
    assert {g["split"] for g in report["composition"]["groups"]} == {"train", "val", "test"}
    assert report["external"]["siteB"]["composition"]["groups"][0]["site"] == "synthetic-5-shift1"
    # the external site's subgroups come from its manifest's columns, scored on its images
    groups = pd.read_csv(sdir / "external" / "siteB" / "subgroups.csv").set_index(["column", "level"])
    females = ext[ext["item"].isin(scored["item"]) & (ext["sex"] == "F")]
    assert groups.loc[("sex", "F"), "n_images"] == len(females) > 0
    assert groups.loc[("sex", "F"), "n_patients"] == females["patient"].nunique()
    assert set(groups.loc["view"].index) == {"AP", "PA"} and (groups.loc["view", "status"] == "scored").all()
    assert groups.loc["age_band", "n_images"].sum() == len(scored)
    # what the manifest's sidecar says of the set (synthetic, not medical data) travels to the report
    audit = json.loads((sdir / "external" / "siteB" / "audit.json").read_text())
    assert any(n.startswith("written by `cxr-ray data synthetic --images 120") for n in audit["notes"])
    html = (sdir / "report" / "index.html").read_text()
    assert "Subgroups" in html and "Noted when siteB was listed: written by" in html
    assert "SYNTHETIC demo images drawn by cxr_ray.synthetic: not medical data" in html
