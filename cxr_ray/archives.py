"""Public chest X-ray archives to manifests (``cxr-ray data manifest --from ARCHIVE PATH -o OUT``).

Each converter reads an archive's published label files as documented, keeps the rows whose image
is present under PATH, and writes one row per image: path, label (1 pneumonia, 0 not), patient,
split (the archive's official split where it has one, blank where the study may carve), site (the
archive), view, sex and age where the archive gives them, and a few columns of its own. The sidecar
``OUT.json`` records the converter, the files read, the label policy, the counts and what to know.

Label files and their semantics (column names as the archives publish them):
  nih       NIH ChestX-ray14, Data_Entry_2017*.csv: Image Index, Finding Labels ('|'-separated
            findings, 'No Finding' when none), Follow-up #, Patient ID, Patient Age (an integer, or
            '058Y' in the 2017 release), Patient Gender (M/F), View Position (PA/AP), original size
            and spacing. Positive: 'Pneumonia' among the findings; negative: every other image
            (other findings included). Official split: test_list.txt (test); train_val_list.txt is
            the pool. Images images*/…/00000001_000.png anywhere under PATH.
  rsna      RSNA Pneumonia Detection Challenge, stage_2_train_labels.csv: patientId, x, y, width,
            height, Target (1: lung opacity suggestive of pneumonia), one row per box, so several
            rows per positive image; stage_2_detailed_class_info.csv: patientId, class (Lung
            Opacity / No Lung Opacity / Not Normal / Normal). Images
            stage_2_train_images/<patientId>.dcm, whose headers give PatientSex, PatientAge and
            ViewPosition. Each patientId names one image: the archive links no two images of a patient.
  chexpert  CheXpert (Irvin et al. 2019), train.csv / valid.csv: Path
            (CheXpert-v1.0[-small]/{train,valid}/patientNNNNN/studyN/viewN_frontal.jpg), Sex, Age,
            Frontal/Lateral, AP/PA, then 14 observations coded 1.0 positive, 0.0 negative, -1.0
            uncertain, blank not mentioned. Patient id from the path. valid.csv (labelled by
            radiologist consensus) becomes the test split; the official test set is not public.
  mimic     MIMIC-CXR-JPG 2.0.0 (PhysioNet): mimic-cxr-2.0.0-chexpert.csv (subject_id, study_id,
            the 14 CheXpert observations coded as CheXpert's) per study, mimic-cxr-2.0.0-metadata.csv
            (dicom_id, subject_id, study_id, ViewPosition, ...) per image, mimic-cxr-2.0.0-split.csv
            (dicom_id, study_id, subject_id, split: train/validate/test), images
            files/pXX/pSUBJECT_ID/sSTUDY_ID/DICOM_ID.jpg; .csv or .csv.gz. Sex and age are not in
            MIMIC-CXR: they are read from MIMIC-IV's patients.csv (subject_id, gender, anchor_age)
            when it is found under PATH (anchor_age is the age in the patient's anchor year).
  folders   NORMAL/ and PNEUMONIA/ folders, or the Kaggle "Chest X-Ray Images (Pneumonia)" layout:
            label from the folder, patient from Kaggle file names (blank when a name has none), the
            Kaggle test folder as the test split.

Blank ("not mentioned") reads as negative: a report that does not mention pneumonia is read as no
pneumonia, the usual reading (CheXpert's U-Zeros and most MIMIC baselines treat blanks so).
Uncertain (-1.0) follows the policy ``uncertain``: exclude (the default: left out), positive or negative.
"""
from __future__ import annotations

import datetime
import glob
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import data, manifest
from .data import DataError

CONVERTERS = ("nih", "rsna", "chexpert", "mimic", "folders")
UNCERTAIN_POLICIES = ("exclude", "positive", "negative")
BLANK_POLICY = "negative: a label left blank means the report does not mention pneumonia"


class ArchiveError(DataError):
    """An archive's files are missing or not as documented; the message names the file and column."""


@dataclass
class Converted:
    """An archive as manifest rows, before writing: ``table`` holds absolute image paths."""
    table: pd.DataFrame
    files: list[str]
    counts: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    uncertain: str | None = None  # the policy applied, for archives that have uncertain labels


# ----------------------------------------------------------------------------- helpers

def _find(root: str, patterns: tuple[str, ...], what: str, required: bool = True) -> str | None:
    """The file (or folder) matching the first of ``patterns`` found in ``root`` or up to two folders
    below (the last in sort order: Data_Entry_2017_v2020.csv over Data_Entry_2017.csv)."""
    for pattern in patterns:
        found = sorted(glob.glob(os.path.join(root, pattern)) + glob.glob(os.path.join(root, "*", pattern))
                       + glob.glob(os.path.join(root, "*", "*", pattern)))
        if found:
            return found[-1]
    if required:
        raise ArchiveError(f"{root}: no {' or '.join(patterns)} found ({what})")
    return None


def _read(path: str, needed: tuple[str, ...]) -> pd.DataFrame:
    """A label table, every cell as text; refuses one that lacks a documented column."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as e:
        raise ArchiveError(f"{path}: not a readable CSV table ({e})") from None
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ArchiveError(f"{path}: no column {missing[0]!r} (columns: {', '.join(map(repr, table.columns))})")
    return table


def _age(values: pd.Series) -> tuple[pd.Series, int]:
    """Ages in years from '58', '58.0' or '058Y'; implausible ones (over 120: typos in NIH's table) blank."""
    years = pd.to_numeric(values.astype(str).str.strip().str.rstrip("Yy"), errors="coerce")
    bad = years > 120
    return years.where(~bad).astype("Int64"), int(bad.sum())


def _sex(values: pd.Series) -> pd.Series:
    text = values.astype(str).str.strip().str.upper().str[:1]
    return text.where(text.isin(["M", "F"]), "")


def _observation(table: pd.DataFrame, column: str, policy: str, path: str) -> tuple[np.ndarray, dict]:
    """A CheXpert-coded observation (1.0, 0.0, -1.0, blank) as labels under ``policy``: 1, 0, or -1
    for a row to leave out (uncertain under 'exclude'); with the counts of each reading."""
    text = table[column].map(manifest.label_text)
    known = {"1": 1, "0": 0, "-1": {"exclude": -1, "positive": 1, "negative": 0}[policy], "": 0}
    bad = np.flatnonzero(~text.isin(list(known)).to_numpy())
    if len(bad):
        raise ArchiveError(f"{path} line {bad[0] + 2}, column {column!r}: value {table[column].iat[bad[0]]!r} is not "
                           "one of 1.0, 0.0, -1.0 or blank")
    counts = {"positive": int((text == "1").sum()), "negative": int((text == "0").sum()),
              "uncertain": int((text == "-1").sum()), "blank_read_as_negative": int((text == "").sum())}
    return text.map(known).to_numpy(), counts


def _keep_present(table: pd.DataFrame, counts: dict, notes: list[str], where: str) -> pd.DataFrame:
    """The rows whose image is on disk; how many are not is counted and said."""
    present = np.array([os.path.isfile(p) for p in table["path"]], dtype=bool)
    if not present.any():
        raise ArchiveError(f"{where}: none of the {len(table)} images the label files list was found (first: "
                           f"{table['path'].iat[0]})")
    if not present.all():
        counts["images_not_found"] = int((~present).sum())
        notes.append(f"{int((~present).sum())} labelled image(s) not found under {where} (e.g. "
                     f"{table.loc[~present, 'path'].iat[0]}): left out")
    return table[present].reset_index(drop=True)


# ----------------------------------------------------------------------------- the archives

def nih(root: str, uncertain: str) -> Converted:
    entry = _find(root, ("Data_Entry_2017*.csv",), "the NIH ChestX-ray14 label file")
    table = _read(entry, ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender",
                          "View Position", "Follow-up #"))
    images = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        images.update((f, os.path.join(dirpath, f)) for f in filenames if f.lower().endswith(".png"))
    findings = table["Finding Labels"].str.split("|")
    age, implausible = _age(table["Patient Age"])
    out = pd.DataFrame({"path": [images.get(n, os.path.join(root, "images", n)) for n in table["Image Index"]],
                        "label": findings.map(lambda f: int("Pneumonia" in [x.strip() for x in f])),
                        "patient": table["Patient ID"].str.strip().str.lstrip("0").replace("", "0"),
                        "split": "", "site": "nih", "view": table["View Position"].str.strip().str.upper(),
                        "sex": _sex(table["Patient Gender"]), "age": age,
                        "follow_up": pd.to_numeric(table["Follow-up #"], errors="coerce"),
                        "findings": table["Finding Labels"]})
    files, notes = [entry], []
    test_list = _find(root, ("test_list.txt",), "the official test split", required=False)
    if test_list:
        test = set(open(test_list).read().split())
        out.loc[table["Image Index"].isin(test).to_numpy(), "split"] = "test"
        files.append(test_list)
        notes.append("official split: test_list.txt is the test split; train_val_list.txt the pool")
    counts = {"label_rows": len(table), "implausible_ages_blanked": implausible}
    if implausible:
        notes.append(f"{implausible} Patient Age value(s) over 120 (typos in the table) left blank")
    notes.append("negatives are every image without 'Pneumonia' among its findings, other findings included")
    return Converted(_keep_present(out, counts, notes, root), files, counts, notes)


def rsna(root: str, uncertain: str) -> Converted:
    import pydicom

    labels_file = _find(root, ("stage_2_train_labels.csv", "stage_1_train_labels.csv"), "the RSNA label file")
    boxes = _read(labels_file, ("patientId", "x", "y", "width", "height", "Target"))
    targets = pd.to_numeric(boxes["Target"], errors="coerce")
    if targets.isna().any() or not targets.isin([0, 1]).all():
        bad = int(np.flatnonzero((targets.isna() | ~targets.isin([0, 1])).to_numpy())[0])
        raise ArchiveError(f"{labels_file} line {bad + 2}, column 'Target': {boxes['Target'].iat[bad]!r} is not 0 or 1")
    per_image = boxes.assign(Target=targets.astype(int), box=(boxes["x"].str.strip() != "").astype(int)) \
        .groupby("patientId", sort=False).agg(label=("Target", "max"), disagree=("Target", "nunique"),
                                              boxes=("box", "sum")).reset_index()
    files, notes = [labels_file], []
    if (per_image["disagree"] > 1).any():
        notes.append(f"{int((per_image['disagree'] > 1).sum())} image(s) with rows of both Target values: positive")
    detail_file = _find(root, ("stage_2_detailed_class_info.csv",), "classes", required=False)
    if detail_file:
        detail = _read(detail_file, ("patientId", "class")).drop_duplicates("patientId")
        per_image["rsna_class"] = per_image["patientId"].map(dict(zip(detail["patientId"], detail["class"])))
        files.append(detail_file)
    folder = _find(root, ("stage_2_train_images", "stage_1_train_images"), "the RSNA images folder")
    out = pd.DataFrame({"path": [os.path.join(folder, f"{p}.dcm") for p in per_image["patientId"]],
                        "label": per_image["label"], "patient": per_image["patientId"], "split": "", "site": "rsna"})
    counts = {"label_rows": len(boxes)}
    out = _keep_present(out.assign(boxes=per_image["boxes"].to_numpy(),
                                   **({"rsna_class": per_image["rsna_class"].to_numpy()} if detail_file else {})),
                        counts, notes, root)
    headers = []
    for p in out["path"]:  # the header only: sex, age and view live there
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["PatientSex", "PatientAge", "ViewPosition"])
        except Exception as e:  # noqa: BLE001 - pydicom raises many types for broken files
            raise ArchiveError(f"{p}: not a readable DICOM header ({e})") from None
        headers.append((str(ds.get("PatientSex", "")), str(ds.get("PatientAge", "")), str(ds.get("ViewPosition", ""))))
    sex, age, view = zip(*headers)
    out["sex"], out["view"] = _sex(pd.Series(sex)), pd.Series(view).str.strip().str.upper()
    out["age"], implausible = _age(pd.Series(age))
    counts["implausible_ages_blanked"] = implausible
    notes.append("each RSNA patientId names one image (the archive links no two images of one patient), so the "
                 "split is patient-level only as far as those ids go; Target marks lung opacities suggestive of "
                 "pneumonia")
    return Converted(out[["path", "label", "patient", "split", "site", "view", "sex", "age",
                          *[c for c in ("boxes", "rsna_class") if c in out]]], files, counts, notes)


def chexpert(root: str, uncertain: str) -> Converted:
    parts, files, counts = [], [], {}
    for name, split in (("train.csv", ""), ("valid.csv", "test")):
        path = _find(root, (name,), "a CheXpert label file", required=False)
        if not path:
            continue
        table = _read(path, ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "Pneumonia"))
        labels, found = _observation(table, "Pneumonia", uncertain, path)
        counts[name] = found
        files.append(path)
        parts.append(table.assign(label=labels, split=split))
    if not parts:
        raise ArchiveError(f"{root}: no train.csv or valid.csv found (CheXpert's label files)")
    table = pd.concat(parts, ignore_index=True)
    locate = _chexpert_locate(os.path.dirname(files[0]), table["Path"].iat[0])
    lateral = table["Frontal/Lateral"].str.strip().str.lower() == "lateral"
    age, implausible = _age(table["Age"])
    out = pd.DataFrame({"path": [os.path.normpath(locate(p)) for p in table["Path"]],
                        "label": table["label"], "patient": table["Path"].str.extract(r"(patient\d+)")[0].fillna(""),
                        "split": table["split"], "site": "chexpert",
                        "view": np.where(lateral, "LATERAL", table["AP/PA"].str.strip().str.upper()),
                        "sex": _sex(table["Sex"]), "age": age,
                        "study": table["Path"].str.extract(r"(study\d+)")[0].fillna("")})
    notes = ["valid.csv (radiologist consensus labels) is the test split"] if "valid.csv" in counts else []
    return _observed(out, counts | {"implausible_ages_blanked": implausible}, notes, files, uncertain, root)


def _chexpert_locate(folder: str, first: str):
    """Path -> file: CheXpert's Path starts with the archive's own folder (CheXpert-v1.0-small/train/...),
    so it is read from the label files' parent; if the folder was renamed, from the label files'
    folder without Path's first part; else from the label files' folder as it is."""
    if os.path.isfile(os.path.join(os.path.dirname(folder), first)):
        return lambda p: os.path.join(os.path.dirname(folder), p)
    if "/" in first and os.path.isfile(os.path.join(folder, first.split("/", 1)[1])):
        return lambda p: os.path.join(folder, p.split("/", 1)[-1])
    return lambda p: os.path.join(folder, p)


def mimic(root: str, uncertain: str) -> Converted:
    chex = _find(root, ("mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-chexpert.csv.gz"), "MIMIC-CXR-JPG labels")
    meta = _find(root, ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz"), "MIMIC-CXR-JPG metadata")
    labels = _read(chex, ("subject_id", "study_id", "Pneumonia"))
    images = _read(meta, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    files, notes = [chex, meta], []
    table = images.merge(labels[["subject_id", "study_id", "Pneumonia"]], on=["subject_id", "study_id"], how="left",
                         indicator=True)
    unlabelled = int((table["_merge"] == "left_only").sum())
    table = table[table["_merge"] == "both"].reset_index(drop=True)
    label, found = _observation(table, "Pneumonia", uncertain, chex)
    counts = {"images": len(images), "images_of_unlabelled_studies": unlabelled, "Pneumonia": found}
    split = pd.Series("", index=table.index)
    split_file = _find(root, ("mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-split.csv.gz"), "the split", required=False)
    if split_file:
        official = _read(split_file, ("dicom_id", "split"))
        named = table["dicom_id"].map(dict(zip(official["dicom_id"], official["split"].str.strip())))
        split = named.map({"train": "train", "validate": "val", "test": "test"}).fillna("")
        files.append(split_file)
        notes.append("official split: train, validate (val) and test from mimic-cxr-2.0.0-split.csv")
    sid = table["subject_id"].str.strip()
    out = pd.DataFrame({"path": [os.path.join(root, "files", f"p{s[:2]}", f"p{s}", f"s{st.strip()}", f"{d.strip()}.jpg")
                                 for s, st, d in zip(sid, table["study_id"], table["dicom_id"])],
                        "label": label, "patient": sid, "split": split, "site": "mimic",
                        "view": table["ViewPosition"].str.strip().str.upper(), "study": table["study_id"].str.strip()})
    patients = _find(root, ("patients.csv", "patients.csv.gz"), "MIMIC-IV demographics", required=False)
    if patients:
        demo = _read(patients, ("subject_id", "gender", "anchor_age"))
        out["sex"] = _sex(sid.map(dict(zip(demo["subject_id"], demo["gender"]))).fillna(""))
        out["age"], _ = _age(sid.map(dict(zip(demo["subject_id"], demo["anchor_age"]))).fillna(""))
        files.append(patients)
        notes.append("sex and age from MIMIC-IV patients.csv (gender, anchor_age: the age in the anchor year)")
    else:
        notes.append("no sex or age: they are in MIMIC-IV's patients.csv, not found under the folder")
    if unlabelled:
        notes.append(f"{unlabelled} image(s) of studies without a row in {os.path.basename(chex)}: left out")
    return _observed(out, counts, notes, files, uncertain, root)


def folders(root: str, uncertain: str) -> Converted:
    source = data.list_kaggle(root)
    items = source.items
    out = pd.DataFrame({"path": [os.path.join(source.path, i) for i in items["item"]], "label": items["label"],
                        "patient": items["patient"].where(items["patient_parsed"], ""),
                        "split": np.where(items["source_split"] == "test", "test", ""),
                        "site": os.path.basename(os.path.normpath(root))})
    blank = int((~items["patient_parsed"]).sum())
    notes = list(source.notes) + ([f"{blank} file name(s) without a Kaggle patient id: patient left blank (each "
                                   "image its own patient)"] if blank else [])
    return Converted(out, [source.path], {"patients_blank": blank}, notes)


def _observed(out: pd.DataFrame, counts: dict, notes: list[str], files: list[str], uncertain: str,
              root: str) -> Converted:
    """Rows of an archive with uncertain labels: those left out by the policy go, then missing images."""
    excluded = int((out["label"] < 0).sum())
    counts["uncertain_left_out"] = excluded
    out = out[out["label"] >= 0].reset_index(drop=True)
    notes.append(f"uncertain Pneumonia labels (-1.0): {uncertain}" + (f" ({excluded} image(s) left out)" if excluded
                                                                        else ""))
    return Converted(_keep_present(out, counts, notes, root), files, counts, notes, uncertain)


def convert(archive: str, root: str, out: str, *, uncertain: str = "exclude", views: list[str] | None = None) -> dict:
    """Write the manifest of an archive to ``out`` (CSV, or Parquet for .parquet) and its sidecar;
    returns the sidecar's content. ``views``: keep only images of these views (e.g. PA, AP)."""
    if archive not in CONVERTERS:
        raise ArchiveError(f"unknown archive {archive!r}: choose one of {', '.join(CONVERTERS)}")
    if uncertain not in UNCERTAIN_POLICIES:
        raise ArchiveError(f"uncertain must be one of {', '.join(UNCERTAIN_POLICIES)} (got {uncertain!r})")
    if not os.path.isdir(root):
        raise ArchiveError(f"{root}: no such folder")
    root = os.path.abspath(root)
    read = {"nih": nih, "rsna": rsna, "chexpert": chexpert, "mimic": mimic, "folders": folders}[archive]
    done = read(root, uncertain)
    table = done.table
    if views:
        wanted = {v.strip().upper() for v in views}
        keep = table["view"].isin(wanted).to_numpy() if "view" in table else np.zeros(len(table), bool)
        done.counts["other_views_left_out"] = int((~keep).sum())
        done.notes.append(f"only views {', '.join(sorted(wanted))} kept ({int((~keep).sum())} image(s) of other views "
                          "left out)")
        table = table[keep].reset_index(drop=True)
    done.counts |= {"images": len(table), "positive": int((table["label"] == 1).sum()),
                    "negative": int((table["label"] == 0).sum()), "patients": int(table["patient"].nunique())}
    if table["label"].nunique() < 2:
        raise ArchiveError(f"{root}: the converted manifest would hold {len(table)} image(s) of a single class "
                           f"(counts: {done.counts}); nothing written")
    info = {"converter": archive, "source": root, "files": done.files, "uncertain": done.uncertain,
            "blank": BLANK_POLICY if done.uncertain else None, "views": views, "counts": done.counts,
            "notes": done.notes, "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return manifest.write(table, out, info)
