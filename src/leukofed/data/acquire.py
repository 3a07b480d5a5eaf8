"""Make a dataset available and describe it: the first stage of the pipeline.

A dataset comes from a folder (used in place), a zip archive (extracted), an HTTP(S) URL (downloaded
with resume and checksum, then extracted) or the synthetic generator. Whatever the source, the images
sit under ``<root>/Original/<class folder>/``; :func:`acquire` scans them into ``manifest.csv`` (one
row per image with its content hash) and records where they came from in ``source.json``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import stat
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import pandas as pd

from leukofed.config import DataParams, DatasetSpec, DownloadParams
from leukofed.data import synthetic
from leukofed.errors import DataError
from leukofed.io import atomic_dir, read_json, write_json, write_text
from leukofed.provenance import DataProvenance, manifest_fingerprint

ORIGINAL = "Original"  # the folder of class folders, as in the official archive
LAYOUT = "<root>/Original/<class folder>/<image>, e.g. Original/Benign/WBC-Benign-001.jpg"
MANIFEST_COLUMNS = ["relpath", "label", "sha256", "bytes"]
HASH_CHUNK_BYTES = 1 << 20
ARCHIVE_NOISE = ("__MACOSX",)  # folders that archivers add beside the content
CONTENT_RANGE = re.compile(r"bytes (\d+)-")


def acquire(name: str, spec: DatasetSpec, data: DataParams, download: DownloadParams, workdir: Path) -> DataProvenance:
    """Make dataset ``name`` available and describe it in ``workdir``.

    Parameters
    ----------
    name : str
        The dataset's name in ``params.yaml`` (recorded in the provenance).
    spec : DatasetSpec
        Where the data comes from: ``synthetic`` (generated into ``workdir/raw``), ``folder`` (used in
        place; a relative path resolves against the current directory), ``zip`` (extracted into
        ``workdir/raw``) or ``url`` (downloaded to ``workdir/download/archive.zip``, then extracted).
    data : DataParams
        Class folders and image extensions.
    download : DownloadParams
        Chunk size, timeout and retries of a URL download.
    workdir : Path
        Output folder; receives ``manifest.csv`` (see :func:`scan_dataset`) and ``source.json``
        (provenance, absolute image root, images per class), both written atomically.

    Returns
    -------
    DataProvenance
        Source, location and fingerprint of the scanned images.
    """
    workdir = Path(workdir)
    root, location = _materialise(spec, data, download, workdir)
    manifest = scan_dataset(root, data)
    provenance = DataProvenance(
        dataset=name,
        source=spec.source,
        location=location,
        fingerprint=manifest_fingerprint(zip(manifest["relpath"], manifest["label"], manifest["sha256"])),
        n_images=len(manifest),
    )
    counts = manifest["label"].value_counts()
    write_text(workdir / "manifest.csv", manifest.to_csv(index=False))
    write_json(
        workdir / "source.json",
        {
            "provenance": provenance.to_dict(),
            "root": str(root.resolve()),
            "class_counts": {label: int(counts.get(label, 0)) for label in data.classes},
            "n_files": len(manifest),
        },
    )
    return provenance


def _materialise(
    spec: DatasetSpec, data: DataParams, download_params: DownloadParams, workdir: Path
) -> tuple[Path, str]:
    """Put the images where they can be scanned; return (layout root, location for the provenance)."""
    raw = workdir / "raw"
    if spec.source == "synthetic":
        with atomic_dir(raw) as tmp:
            synthetic.generate(spec.synthetic, _folders_in_class_order(data), tmp)
        return raw, f"synthetic:seed={spec.synthetic.seed}"
    if spec.source == "folder":
        return locate_layout_root(Path(spec.path)), spec.path
    if spec.source == "zip":
        archive, location = Path(spec.path), spec.path
    else:
        archive = download(spec.url, spec.sha256, workdir / "download" / "archive.zip", download_params)
        location = spec.url
    safe_extract_zip(archive, raw)
    return locate_layout_root(raw), location


def _folders_in_class_order(data: DataParams) -> list[str]:
    """One folder per class, in the order of ``data.classes`` (the generator's class index)."""
    if len(data.class_folders) != len(data.classes):
        raise DataError(
            f"data.class_folders: the synthetic source draws one folder per class, but {len(data.class_folders)} "
            f"folders map to {len(data.classes)} classes; map exactly one folder to each class in params.yaml"
        )
    return sorted(data.class_folders, key=lambda folder: data.classes.index(data.class_folders[folder]))


def locate_layout_root(path: Path) -> Path:
    """Find the folder that contains ``Original/``.

    Parameters
    ----------
    path : Path
        A dataset folder: the one holding ``Original/``, or one with exactly one extra top folder
        that holds it (as archives often have).

    Returns
    -------
    Path
        The folder whose ``Original/`` holds the class folders.

    Raises
    ------
    DataError
        If ``path`` is missing or no (or more than one) candidate holds ``Original/``.
    """
    path = Path(path)
    if path.is_file():
        raise DataError(f"{path}: is a file, not a dataset folder; for a zip archive use source: zip in params.yaml")
    if not path.is_dir():
        raise DataError(
            f"{path}: dataset folder not found; check the dataset's path in params.yaml (expected layout {LAYOUT})"
        )
    if (path / ORIGINAL).is_dir():
        return path
    candidates = [child for child in _visible_dirs(path) if (child / ORIGINAL).is_dir()]
    if len(candidates) == 1:
        return candidates[0]
    found = f"several candidates ({', '.join(sorted(c.name for c in candidates))})" if candidates else "no"
    raise DataError(
        f"{path}: {found} '{ORIGINAL}/' folder here or one level below; expected layout {LAYOUT}. "
        "Point the dataset's path at the folder that contains Original/"
    )


def _visible_dirs(path: Path) -> list[Path]:
    """Sub-folders, skipping hidden ones and archiver noise."""
    return sorted(
        child
        for child in path.iterdir()
        if child.is_dir() and not child.name.startswith(".") and child.name not in ARCHIVE_NOISE
    )


def scan_dataset(root: Path, data: DataParams) -> pd.DataFrame:
    """List the images of a dataset with their class and content hash.

    Parameters
    ----------
    root : Path
        The folder that contains ``Original/<class folder>/``.
    data : DataParams
        ``class_folders`` (folder -> class) and ``image_extensions`` (matched case-insensitively).

    Returns
    -------
    pandas.DataFrame
        Columns ``relpath`` (POSIX, relative to ``root``), ``label``, ``sha256``, ``bytes``; one row
        per image file (hidden files are ignored), sorted by ``relpath``.

    Raises
    ------
    DataError
        If a folder of ``data.class_folders`` is missing, ``Original/`` holds a folder that is not in
        it, or there is no image at all.
    """
    original = Path(root) / ORIGINAL
    _check_class_folders(original, data)
    extensions = {ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in data.image_extensions}
    rows = [
        (file.relative_to(root).as_posix(), label, file_sha256(file), file.stat().st_size)
        for folder, label in data.class_folders.items()
        for file in _visible_files(original / folder)
        if file.suffix.lower() in extensions
    ]
    if not rows:
        raise DataError(
            f"{original}: no images (extensions {sorted(extensions)}) in the class folders "
            f"{sorted(data.class_folders)}; "
            f"put the images in {LAYOUT}, or add their extension to data.image_extensions in params.yaml"
        )
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    return manifest.sort_values("relpath", ignore_index=True)


def _check_class_folders(original: Path, data: DataParams) -> None:
    present = {child.name for child in _visible_dirs(original)} if original.is_dir() else set()
    missing = [folder for folder in data.class_folders if folder not in present]
    if missing:
        raise DataError(
            f"{original}: class folder(s) {missing} listed in data.class_folders are missing; add them "
            f"(layout {LAYOUT}), or remove them from data.class_folders in params.yaml"
        )
    extra = sorted(present - set(data.class_folders))
    if extra:
        raise DataError(
            f"{original}: folder(s) {extra} not in data.class_folders; add them to data.class_folders in "
            "params.yaml (each mapped to one of data.classes), or remove the folder(s)"
        )


def _visible_files(folder: Path) -> list[Path]:
    """Files below ``folder``, skipping hidden files and folders (.DS_Store, ._ resource forks)."""
    return [
        file
        for file in folder.rglob("*")
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(folder).parts)
    ]


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def load_source(workdir: Path) -> tuple[Path, pd.DataFrame, DataProvenance]:
    """Read back what :func:`acquire` wrote.

    Parameters
    ----------
    workdir : Path
        The folder :func:`acquire` wrote into.

    Returns
    -------
    root : Path
        Absolute folder that ``relpath`` is relative to.
    manifest : pandas.DataFrame
        As returned by :func:`scan_dataset`.
    provenance : DataProvenance
    """
    workdir = Path(workdir)
    source_path, manifest_path = workdir / "source.json", workdir / "manifest.csv"
    for path in (source_path, manifest_path):
        if not path.is_file():
            raise DataError(f"{path}: not found; run the acquire stage first (leukofed acquire --workdir {workdir})")
    source = read_json(source_path)
    manifest = pd.read_csv(
        manifest_path,
        dtype={"relpath": str, "label": str, "sha256": str, "bytes": "int64"},
        keep_default_na=False,  # a class named "NA" stays a string
    )
    return Path(source["root"]), manifest, DataProvenance.from_dict(source["provenance"])


def safe_extract_zip(archive: Path, dest: Path) -> None:
    """Extract a zip archive, refusing entries that could write outside ``dest``.

    Parameters
    ----------
    archive : Path
        The zip file.
    dest : Path
        Folder to extract into; it is replaced atomically, so nothing is left there on failure.

    Raises
    ------
    DataError
        If the archive is missing, not a zip or corrupt, or has an absolute path, a ``..`` component
        or a symbolic link among its entries.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"{archive}: archive not found; check the dataset's path in params.yaml")
    try:
        with zipfile.ZipFile(archive) as zipped:
            for entry in zipped.infolist():
                _check_entry(archive, entry)
            with atomic_dir(dest) as tmp:
                zipped.extractall(tmp)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise DataError(
            f"{archive}: not a valid zip archive ({error}); download it again, or point the dataset at the "
            "extracted folder with source: folder"
        ) from None


def _check_entry(archive: Path, entry: zipfile.ZipInfo) -> None:
    name = entry.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        reason = "absolute path"
    elif ".." in parts:
        reason = "'..' leads outside the extraction folder"
    elif stat.S_ISLNK(entry.external_attr >> 16):
        reason = "symbolic link"
    else:
        return
    raise DataError(
        f"{archive}: refusing archive entry '{entry.filename}' ({reason}); the archive is unsafe to extract. "
        "Get a clean copy of the dataset, or extract it yourself and use source: folder"
    )


def download(url: str, sha256: str, dest: Path, params: DownloadParams) -> Path:
    """Download ``url`` to ``dest``, resuming an interrupted download and verifying its checksum.

    The data streams into ``dest`` + ``.part``; an existing ``.part`` is resumed with an HTTP Range
    request (or restarted if the server ignores it). Connection errors and short reads are retried.
    The file is renamed onto ``dest`` only after its sha256 matches, so ``dest`` is always complete.

    Parameters
    ----------
    url : str
        HTTP(S) address of the file.
    sha256 : str
        Expected hex digest.
    dest : Path
        Final path; if it already exists with the expected digest nothing is downloaded.
    params : DownloadParams
        ``chunk_bytes`` per read, ``timeout_s`` per socket operation, ``retries`` after the first try.

    Returns
    -------
    Path
        ``dest``.

    Raises
    ------
    DataError
        If the server refuses the request, every attempt fails, or the digest differs (the
        partial file is then removed).
    """
    dest = Path(dest)
    if dest.is_file() and file_sha256(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A fixed partial name (not a random temporary file) is what lets a later run resume.
    part = dest.with_name(dest.name + ".part")
    _fetch_with_retries(url, part, params)
    actual = file_sha256(part)
    if actual != sha256:
        part.unlink()
        raise DataError(
            f"{url}: checksum mismatch: expected sha256 {sha256}, got {actual}; the download was removed. "
            "If the file changed on purpose, update the dataset's sha256 in params.yaml; otherwise check the URL"
        )
    os.replace(part, dest)
    return dest


class _ShortRead(Exception):
    """The connection ended before the announced number of bytes arrived."""


def _fetch_with_retries(url: str, part: Path, params: DownloadParams) -> None:
    attempts = params.retries + 1
    last_error: Exception | None = None
    for _ in range(attempts):
        try:
            _fetch(url, part, params)
            return
        except urllib.error.HTTPError as error:  # before URLError, its base class
            if error.code < 500 and error.code != 416:
                raise DataError(
                    f"{url}: the server answered HTTP {error.code} {error.reason}; "
                    "check the dataset's url in params.yaml"
                ) from None
            if error.code == 416:  # the partial file is no prefix the server can continue: start over
                part.unlink(missing_ok=True)
            last_error = error
        except (OSError, http.client.HTTPException, _ShortRead) as error:  # OSError covers URLError, timeouts
            last_error = error
    raise DataError(
        f"{url}: download failed after {attempts} attempt(s) (last error: {last_error}); check the URL and the "
        f"connection, or raise download.retries / download.timeout_s in params.yaml. The partial file {part} "
        "is kept and resumed next time"
    )


def _fetch(url: str, part: Path, params: DownloadParams) -> None:
    """One request: append to ``part`` from where it ends, or rewrite it if the server sends everything."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    # build_opener reads the proxy environment now, not when urllib first ran.
    with urllib.request.build_opener().open(request, timeout=params.timeout_s) as response:
        if offset and not _continues_at(response, offset):
            offset = 0
        expected = response.headers.get("Content-Length")
        received = 0
        with open(part, "ab" if offset else "wb") as out:
            while chunk := response.read(params.chunk_bytes):
                out.write(chunk)
                received += len(chunk)
    if expected is not None and received < int(expected):
        raise _ShortRead(f"received {received} of {expected} bytes")


def _continues_at(response: http.client.HTTPResponse, offset: int) -> bool:
    """Whether the server honoured the Range request (206 starting at ``offset``)."""
    match = CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    return response.status == 206 and match is not None and int(match.group(1)) == offset
