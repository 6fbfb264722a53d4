"""Study directories on local disk, NFS, or object storage (s3://, gs://), one API for all.

Everything a study writes besides Ray's own experiment files goes through here, so the
layout is identical on every backend and report/serve can read a study from any of them.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def normalize(uri: str | Path) -> str:
    """Absolute local paths (Train workers chdir elsewhere) or URIs unchanged."""
    uri = str(uri)
    return uri.rstrip("/") if is_remote(uri) else os.path.abspath(uri.removeprefix("file://"))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file") from None


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically on local disk (object stores are atomic per object already)."""
    fs, path = _fs(uri)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def read_csv(uri: str, **kwargs) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(read_bytes(uri)), **kwargs)


def write_csv(uri: str, df: pd.DataFrame) -> None:
    write_text(uri, df.to_csv(index=False))


def read_json(uri: str):
    return json.loads(read_text(uri))


def write_json(uri: str, obj) -> None:
    write_text(uri, json.dumps(obj, indent=1, default=str))


def upload_dir(local: str | Path, uri: str, last: str) -> None:
    """Copy a local directory's files to ``uri``; a reader that sees the file ``last`` sees them all.

    Locally the copy lands under a temporary name and is renamed into place (whole or not at all);
    object stores have no rename, so there ``last`` is uploaded after every other file.
    """
    if not is_remote(uri):
        path = os.path.abspath(uri)
        tmp = f"{path}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(local, tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        return
    for name in sorted(os.listdir(local), key=lambda n: n == last):
        write_bytes(join(uri, name), Path(local, name).read_bytes())


def delete_dir(uri: str) -> None:
    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def listdir(uri: str) -> list[str]:
    fs, path = _fs(uri)
    info = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(os.path.basename(i.path) for i in info)


def local_dir(uri: str, cache: str | None = None) -> str:
    """A local directory with the content of ``uri`` (downloaded once if remote)."""
    if not is_remote(uri):
        return os.path.abspath(uri)
    target = Path(cache or tempfile.mkdtemp(prefix="cxr-ray-")) / uri.split("://", 1)[1].strip("/")
    if not target.exists():
        fs, path = _fs(uri)
        tmp = Path(str(target) + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        tmp.rename(target)
    return str(target)
