"""Manifests: any labelled collection of chest films as a table, checked before anything is decoded.

A manifest is a CSV (optionally gzipped) or Parquet table, on local disk, NFS or S3/GCS (through
``storage``), with one row per image:

  path     where the image is: relative to the table's folder (or to ``root``), absolute, or a URI;
           JPEG, PNG or DICOM (recognised by content, never by name)
  label    whose values are read through ``positive`` / ``negative`` (e.g. 1/0, PNEUMONIA/NORMAL)
  patient  who the image shows; a blank cell means unknown (that image is its own patient, and the
           data report counts it). Without this column the table is refused unless the format says
           ``patient: image``: then every image is its own patient and the report says the split is
           image-level, and why that can leak
  split    optional: train, val or test (pre-assigned, e.g. an official test split; respected), or
           blank (the study carves it)
  site     optional: where the image was taken
  ...      every other column (sex, age, view, device, ...) is metadata, carried through the cache
           index and split.csv to every evaluation

Column names and label values are configurable (``ManifestFormat``: the spec's ``columns``,
``positive``, ``negative`` and ``root``). A sidecar ``<table>.json`` written by ``cxr-ray data
manifest`` or ``cxr-ray data synthetic`` (the converter or command, its source files, the uncertain-label
policy, counts) adds its notes.

Every problem is one error naming the row and the column: a missing column, an unknown or blank
label, a blank path, a missing file, a path that leaves ``root``, the same image twice with other
labels (or patient, or split), a patient in two pre-assigned splits, an unknown split value, a
metadata column whose name the cache reserves, a table with a single class.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from . import storage
from .data import RESERVED_COLUMNS, SPLITS, DataError

ROLES = ("path", "label", "patient", "split", "site")
REQUIRED = ("path", "label", "patient")
PATIENT_IS_IMAGE = "image"  # columns: {patient: image}: no patient ids, an image-level split
UNASSIGNED = "pool"  # source_split of a row without a pre-assigned split


class ManifestError(DataError):
    """A manifest that cannot be used; the message names the table, the row and the column."""


@dataclass(frozen=True)
class ManifestFormat:
    """How to read a manifest: column names per role, the label values of each class, and the root
    that relative paths start from (default: the table's folder) and that no path may leave."""
    columns: dict = field(default_factory=dict)  # role -> column name; a role not named uses its own name
    positive: tuple = ("1", "PNEUMONIA")
    negative: tuple = ("0", "NORMAL")
    root: str | None = None

    def column(self, role: str) -> str:
        return self.columns.get(role) or role


@dataclass
class Listing:
    """A checked manifest: one row per distinct image, where each image is, and what was noticed."""
    items: pd.DataFrame  # item, label, patient (None if unknown), source_split, [site], metadata...
    locations: list[str]  # absolute path or URI of each item's file
    notes: list[str]
    fingerprint: str  # changes when any listed file changes (not when labels or metadata do)
    image_level: bool  # patient: image


def label_text(value) -> str:
    """A label cell or a configured value, compared as text: 1, 1.0 and "1" are the same, case ignored."""
    text = str(value).strip()
    try:
        number = float(text)
        if number.is_integer():
            return str(int(number))
    except ValueError:
        pass
    return text.lower()


def read_table(uri: str) -> pd.DataFrame:
    """Every cell of a CSV (.csv, .csv.gz) or Parquet (.parquet, .pq) table as text, '' when blank."""
    parquet = uri.lower().endswith((".parquet", ".pq"))
    try:
        raw = io.BytesIO(storage.read_bytes(uri))  # storage un-gzips a .gz itself
        if parquet:
            table = pd.read_parquet(raw)
            return table.astype(object).where(table.notna(), "").astype(str)
        return pd.read_csv(raw, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ManifestError(f"{uri}: no such manifest file") from None
    except (ValueError, OSError, pd.errors.ParserError) as e:  # unreadable, or pyarrow's and pandas' parse errors
        raise ManifestError(f"{uri}: not a readable {'Parquet' if parquet else 'CSV'} table "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _row_namer(uri: str):
    """Rows as a user finds them: a CSV's line number in an editor (the header is line 1), a Parquet row number."""
    if uri.lower().endswith((".parquet", ".pq")):
        return lambda i: f"{uri} row {i + 1}"
    return lambda i: f"{uri} line {i + 2}"


def _resolve(paths: list[str], base: str, root: str | None, row, column: str) -> list[str]:
    """Absolute path or URI of each cell (relative ones from ``base``); with ``root`` (absolute or a
    URI), refuse a path that leaves it."""
    out = []
    root_norm = root.rstrip("/") if root is not None and storage.is_remote(root) else root
    for i, p in enumerate(paths):
        if storage.is_remote(p):
            location = p
        elif storage.is_remote(base) and not os.path.isabs(p):
            location = base.rstrip("/") + "/" + p
        else:
            location = os.path.normpath(os.path.join(base, p.removeprefix("file://")))
        if storage.is_remote(location):  # no '..' in object keys: resolve them as a path would
            scheme, rest = location.split("://", 1)
            location = f"{scheme}://{os.path.normpath('/' + rest)[1:]}"
        if root_norm is not None:
            if storage.is_remote(root_norm) or storage.is_remote(location):
                inside = location.startswith(root_norm + "/")
            else:
                inside = os.path.commonpath([root_norm, location]) == root_norm
            if not inside:
                raise ManifestError(f"{row(i)}, column {column!r}: {p} resolves to {location}, outside the root "
                                    f"{root}")
        out.append(location)
    return out


def _file_stats(locations: list[str], row, column: str, paths: list[str]) -> list[tuple[int, int]]:
    """(size, mtime in ns) of every file, or one error naming the first missing one and how many are."""
    stats: list[tuple[int, int] | None] = [None] * len(locations)
    remote: dict[str, list[int]] = {}
    for i, location in enumerate(locations):
        if storage.is_remote(location):
            remote.setdefault(location.split("://", 1)[0] + "://" + location.split("://", 1)[1].split("/", 1)[0],
                              []).append(i)
            continue
        try:
            st = os.stat(location)
            if not os.path.isdir(location):
                stats[i] = (st.st_size, st.st_mtime_ns)
        except OSError:
            pass
    for bucket, rows in remote.items():  # one recursive listing of the common prefix, not a request per file
        fs, _ = pafs.FileSystem.from_uri(bucket)
        keys = [locations[i].split("://", 1)[1] for i in rows]
        prefix = os.path.dirname(os.path.commonprefix(keys)) or keys[0].split("/", 1)[0]
        try:
            listed = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        except OSError as e:
            raise ManifestError(f"{row(rows[0])}, column {column!r}: cannot list {bucket}/{prefix} ({e})") from None
        found = {f.path: (f.size, f.mtime_ns or 0) for f in listed if f.type == pafs.FileType.File}
        for i, key in zip(rows, keys):
            stats[i] = found.get(key)
    missing = [i for i, s in enumerate(stats) if s is None]
    if missing:
        i = missing[0]
        more = f" ({len(missing)} of {len(locations)} files are missing)" if len(missing) > 1 else ""
        raise ManifestError(f"{row(i)}, column {column!r}: {paths[i]}: no such file ({locations[i]}){more}")
    return stats  # type: ignore[return-value]


def load(uri: str, fmt: ManifestFormat | None = None) -> Listing:
    """Read and check a manifest (see the module docstring); nothing is decoded."""
    fmt = fmt or ManifestFormat()
    root = fmt.root
    if root is not None and not storage.is_remote(root):
        root = os.path.abspath(os.path.expanduser(root))
    table = read_table(uri)
    row = _row_namer(uri)
    if not len(table):
        raise ManifestError(f"{uri}: the manifest has no rows")
    image_level = fmt.columns.get("patient") == PATIENT_IS_IMAGE
    cols = _columns(table, fmt, uri, image_level)
    labels = _labels(table[cols["label"]], fmt, row)

    paths = table[cols["path"]].str.strip().tolist()
    blank = [i for i, p in enumerate(paths) if not p]
    if blank:
        raise ManifestError(f"{row(blank[0])}, column {cols['path']!r}: blank path")
    base = root or (uri.rsplit("/", 1)[0] if storage.is_remote(uri) else os.path.dirname(os.path.abspath(uri)))
    locations = _resolve(paths, base, root, row, cols["path"])

    split = pd.Series(UNASSIGNED, index=table.index)
    if "split" in cols:
        split = table[cols["split"]].str.strip().str.lower()
        bad = np.flatnonzero(~split.isin(SPLITS + ("",)).to_numpy())
        if len(bad):
            raise ManifestError(f"{row(bad[0])}, column {cols['split']!r}: split {table[cols['split']].iat[bad[0]]!r} "
                                f"is not one of {', '.join(SPLITS)} (or blank: carved by the study)")
        split = split.replace("", UNASSIGNED)
    patient = pd.Series("", index=table.index) if image_level else table[cols["patient"]].str.strip()
    if not image_level and (patient == "").all():
        raise ManifestError(f"{uri}, column {cols['patient']!r}: blank in every row. Fill in patient ids, or say "
                            "columns: {patient: image} for an image-level split (stated in the report)")

    frame = pd.DataFrame({"location": locations, "label": labels, "patient": patient, "split": split})
    first, notes = _repeats(frame, table, cols, row, paths)
    _check_assigned_patients(frame[first], cols, row)
    kept = np.flatnonzero(first)
    if len(set(labels[kept])) < 2:
        only = "positive" if labels[kept[0]] == 1 else "negative"
        raise ManifestError(f"{uri}, column {cols['label']!r}: every image is {only}; a classifier needs images of "
                            f"both classes (positive: {', '.join(map(str, fmt.positive))}; negative: "
                            f"{', '.join(map(str, fmt.negative))})")
    metadata = [c for c in table.columns if c not in set(cols.values())]
    clash = [c for c in metadata if c in RESERVED_COLUMNS]
    if clash:
        raise ManifestError(f"{uri}, column {clash[0]!r}: the name is reserved ({', '.join(RESERVED_COLUMNS)}); "
                            "rename the column, or name it in columns: if it holds a role")

    stats = _file_stats([locations[i] for i in kept], lambda j: row(kept[j]), cols["path"], [paths[i] for i in kept])
    digest = hashlib.sha1()
    for i, (size, mtime) in zip(kept, stats):
        digest.update(f"{locations[i]}\t{size}\t{mtime}\n".encode())

    items = pd.DataFrame({"item": [paths[i] for i in kept], "label": labels[kept],
                          "patient": [p or None for p in patient.iloc[kept]],
                          "source_split": split.iloc[kept].to_numpy()})
    if "site" in cols:
        items["site"] = table[cols["site"]].iloc[kept].to_numpy()
    for c in metadata:
        items[c] = _typed(table[c].iloc[kept].reset_index(drop=True))
    if image_level:
        notes.append("patient: image: every image is its own patient, so the split is image-level (images of one "
                     "patient can land on both sides of it)")
    elif items["patient"].isna().any():
        notes.append(f"{int(items['patient'].isna().sum())} image(s) with a blank {cols['patient']!r}: each is its "
                     "own patient")
    return Listing(items, [locations[i] for i in kept], notes + sidecar_notes(uri), digest.hexdigest(), image_level)


def _columns(table: pd.DataFrame, fmt: ManifestFormat, uri: str, image_level: bool) -> dict[str, str]:
    """role -> column name, for the roles the table has; refuses a required or named role it lacks."""
    known = ", ".join(map(repr, table.columns))
    cols = {}
    for role in ROLES:
        name = fmt.column(role)
        if role == "patient" and image_level:
            continue
        if name in table.columns:
            cols[role] = name
        elif role == "patient":
            raise ManifestError(f"{uri}: no patient column {name!r} (columns: {known}). Name the column that holds "
                                "patient ids (columns: {patient: NAME}), or say columns: {patient: image} to treat "
                                "every image as its own patient (an image-level split, stated in the report)")
        elif role in REQUIRED or role in fmt.columns:
            raise ManifestError(f"{uri}: no {role} column {name!r} (columns: {known})")
    return cols


def _labels(cells: pd.Series, fmt: ManifestFormat, row) -> np.ndarray:
    """1 for a positive value, 0 for a negative one; anything else (blank included) is refused."""
    positive, negative = {label_text(v) for v in fmt.positive}, {label_text(v) for v in fmt.negative}
    texts = cells.map(label_text)
    labels = np.where(texts.isin(positive), 1, np.where(texts.isin(negative), 0, -1))
    unknown = np.flatnonzero(labels < 0)
    if len(unknown):
        values = sorted(set(cells.iloc[unknown]))
        raise ManifestError(
            f"{row(unknown[0])}, column {cells.name!r}: label {cells.iat[unknown[0]]!r} is neither positive "
            f"({', '.join(map(str, fmt.positive))}) nor negative ({', '.join(map(str, fmt.negative))}); "
            f"{len(unknown)} row(s) in all, values {', '.join(repr(v) for v in values[:8])}"
            + (" ..." if len(values) > 8 else "") + " (set positive/negative, or fix the rows)")
    return labels


def _repeats(frame: pd.DataFrame, table: pd.DataFrame, cols: dict, row, paths: list[str]) -> tuple[np.ndarray, list]:
    """Which rows to keep: an image listed twice must say the same label, patient and split each
    time (else one error naming both rows), and is then kept once."""
    repeated = frame.duplicated("location", keep=False).to_numpy()
    if not repeated.any():
        return np.ones(len(frame), bool), []
    for role in ("label", "patient", "split"):
        if role not in cols:
            continue
        spread = frame[repeated].groupby("location")[role].nunique()
        conflicting = spread[spread > 1]
        if len(conflicting):
            rows = np.flatnonzero((frame["location"] == conflicting.index[0]).to_numpy())
            raise ManifestError(f"{row(rows[1])}, column {cols[role]!r}: the same image as {row(rows[0])} "
                                f"({paths[rows[0]]}) with another {role} ({table[cols[role]].iat[rows[1]]!r} vs "
                                f"{table[cols[role]].iat[rows[0]]!r}); {len(conflicting)} image(s) listed with "
                                f"conflicting {role}s")
    first = ~frame.duplicated("location", keep="first").to_numpy()
    return first, [f"{int((~first).sum())} repeated row(s) of the same image with the same label left out"]


def _check_assigned_patients(frame: pd.DataFrame, cols: dict, row) -> None:
    """No patient may be pre-assigned to two splits (a blank row of a patient is not an assignment)."""
    assigned = frame[(frame["split"] != UNASSIGNED) & (frame["patient"] != "")]
    spread = assigned.groupby("patient")["split"].nunique()
    if (spread > 1).any():
        who = spread[spread > 1].index[0]
        rows = assigned.index[assigned["patient"] == who]
        other = next(r for r in rows if assigned.at[r, "split"] != assigned.at[rows[0], "split"])
        raise ManifestError(f"{row(other)}, column {cols['split']!r}: patient {who!r} is pre-assigned to "
                            f"{assigned.at[other, 'split']} here and to {assigned.at[rows[0], 'split']} at "
                            f"{row(rows[0])}; {int((spread > 1).sum())} patient(s) span two pre-assigned splits")


def _typed(values: pd.Series) -> pd.Series:
    """A metadata column as numbers when every non-blank cell is one (ages, sizes), else as text."""
    numbers = pd.to_numeric(values.replace("", np.nan), errors="coerce")
    if numbers.notna().sum() == (values != "").sum() and numbers.notna().any():
        return numbers
    return values


def sidecar_notes(uri: str) -> list[str]:
    """What the converter recorded next to the table (``<table>.json``), in words."""
    side = uri + ".json"
    if not storage.exists(side):
        return []
    try:
        info = storage.read_json(side)
    except (ValueError, OSError):
        return [f"{side}: unreadable sidecar, ignored"]
    if "command" in info:
        head = f"written by `{info['command']}` from {info.get('source', '?')}"
    else:
        head = f"converted by `cxr-ray data manifest --from {info.get('converter', '?')}` from {info.get('source', '?')}"
    if info.get("uncertain"):
        head += f"; uncertain labels: {info['uncertain']}"
    return [head] + list(info.get("notes", []))


def write(table: pd.DataFrame, out: str, info: dict) -> dict:
    """Write a manifest (CSV, or Parquet for .parquet/.pq) and its sidecar ``<out>.json``. Image paths
    under the manifest's folder are written relative to it (the pair can move together)."""
    folder = os.path.dirname(os.path.abspath(out))
    if not storage.is_remote(out):
        table = table.assign(path=[os.path.relpath(p, folder) if not storage.is_remote(p)
                                   and os.path.commonpath([folder, os.path.abspath(p)]) == folder else p
                                   for p in table["path"]])
    if out.lower().endswith((".parquet", ".pq")):
        buf = io.BytesIO()
        table.to_parquet(buf, index=False)
        storage.write_bytes(out, buf.getvalue())
    else:
        storage.write_csv(out, table)
    storage.write_text(out + ".json", json.dumps(info, indent=1, default=str))
    return info
