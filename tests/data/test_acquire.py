"""Dataset acquisition: layout discovery, scanning, safe zip extraction, resumable download, end to end."""

from __future__ import annotations

import hashlib
import io
import re
import stat
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from leukofed.config import DataParams, DatasetSpec, DownloadParams, NearDuplicateParams, SyntheticParams
from leukofed.data.acquire import acquire, download, load_source, locate_layout_root, safe_extract_zip, scan_dataset
from leukofed.errors import DataError
from leukofed.io import read_json
from leukofed.provenance import manifest_fingerprint

CLASSES = ["Benign", "Early", "Pre", "Pro"]
PAYLOAD = bytes(range(256)) * 64  # 16 KiB: several download chunks


@pytest.fixture
def data_params() -> DataParams:
    return DataParams(
        classes=CLASSES,
        class_folders={name: name for name in CLASSES},
        image_extensions=[".jpg", ".png"],
        image_size=32,
        on_invalid="fail",
        max_image_pixels=1_000_000,
        near_duplicate=NearDuplicateParams(hash_size=8, max_distance=4),
    )


@pytest.fixture
def download_params() -> DownloadParams:
    return DownloadParams(chunk_bytes=1024, timeout_s=5.0, retries=2)


def make_dataset(root: Path, folders: list[str] = CLASSES, per_class: int = 2) -> Path:
    """Write tiny distinct JPEGs into root/Original/<folder>/."""
    for k, folder in enumerate(folders):
        (root / "Original" / folder).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (40 * k, 60 * i, 90)).save(root / "Original" / folder / f"{folder}-{i}.jpg")
    return root


def zip_folder(folder: Path, archive: Path | io.BytesIO, prefix: str = "") -> Path | io.BytesIO:
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in sorted(folder.rglob("*")):
            zipped.write(file, prefix + file.relative_to(folder).as_posix())
    return archive


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint_of(manifest: pd.DataFrame) -> str:
    return manifest_fingerprint(zip(manifest["relpath"], manifest["label"], manifest["sha256"]))


# --- layout --------------------------------------------------------------------------------------


def test_layout_root_is_the_folder_itself(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    assert locate_layout_root(tmp_path) == tmp_path


def test_layout_root_one_extra_top_folder(tmp_path: Path) -> None:
    make_dataset(tmp_path / "leukemia")
    (tmp_path / "__MACOSX").mkdir()  # archiver noise beside the content is ignored
    assert locate_layout_root(tmp_path) == tmp_path / "leukemia"


@pytest.mark.parametrize("create", [True, False], ids=["no-Original", "missing-path"])
def test_layout_root_error_names_path(tmp_path: Path, create: bool) -> None:
    path = tmp_path / "dataset"
    if create:
        (path / "Segmented" / "Benign").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{re.escape(str(path))}.*Original"):
        locate_layout_root(path)


def test_layout_root_of_a_zip_file_suggests_zip_source(tmp_path: Path) -> None:
    (tmp_path / "data.zip").write_bytes(b"")
    with pytest.raises(DataError, match="data.zip: is a file.*source: zip"):
        locate_layout_root(tmp_path / "data.zip")


# --- scanning ------------------------------------------------------------------------------------


def test_missing_class_folder(tmp_path: Path, data_params: DataParams) -> None:
    make_dataset(tmp_path, folders=CLASSES[:3])
    with pytest.raises(DataError, match=r"'Pro'.*missing.*remove them from data.class_folders in params.yaml"):
        scan_dataset(tmp_path, data_params)


def test_extra_class_folder(tmp_path: Path, data_params: DataParams) -> None:
    make_dataset(tmp_path, folders=[*CLASSES, "Mature"])
    with pytest.raises(DataError, match=r"'Mature'.*add them to data.class_folders in params.yaml.*or remove"):
        scan_dataset(tmp_path, data_params)


def test_empty_dataset(tmp_path: Path, data_params: DataParams) -> None:
    make_dataset(tmp_path, per_class=0)
    (tmp_path / "Original" / "Pro" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"Original: no images.*data.image_extensions"):
        scan_dataset(tmp_path, data_params)


def test_manifest_columns_order_and_filters(tmp_path: Path, data_params: DataParams) -> None:
    make_dataset(tmp_path)
    benign = tmp_path / "Original" / "Benign"
    Image.new("RGB", (8, 8)).save(benign / "UPPER.PNG")  # extensions match case-insensitively
    (benign / ".hidden.jpg").write_bytes(b"x")
    (benign / "Thumbs.db").write_bytes(b"x")

    manifest = scan_dataset(tmp_path, data_params)

    assert list(manifest.columns) == ["relpath", "label", "sha256", "bytes"]
    assert list(manifest["relpath"]) == sorted(manifest["relpath"])
    assert len(manifest) == 9 and "Original/Benign/UPPER.PNG" in set(manifest["relpath"])
    row = manifest.set_index("relpath").loc["Original/Pro/Pro-1.jpg"]
    content = (tmp_path / "Original" / "Pro" / "Pro-1.jpg").read_bytes()
    assert (row["label"], row["sha256"], row["bytes"]) == ("Pro", sha256(content), len(content))


def test_fingerprint_ignores_order_and_tracks_content(tmp_path: Path, data_params: DataParams) -> None:
    make_dataset(tmp_path)
    manifest = scan_dataset(tmp_path, data_params)
    assert fingerprint_of(manifest.sample(frac=1.0, random_state=1)) == fingerprint_of(manifest)

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "Original" / "Early" / "Early-0.jpg")
    assert fingerprint_of(scan_dataset(tmp_path, data_params)) != fingerprint_of(manifest)


# --- zip -----------------------------------------------------------------------------------------


def test_zip_extracts_with_extra_top_folder(tmp_path: Path, data_params: DataParams) -> None:
    archive = zip_folder(make_dataset(tmp_path / "src"), tmp_path / "data.zip", prefix="leukemia/")
    safe_extract_zip(archive, tmp_path / "raw")
    root = locate_layout_root(tmp_path / "raw")
    assert root == tmp_path / "raw" / "leukemia"
    assert len(scan_dataset(root, data_params)) == 8


@pytest.mark.parametrize("entry", ["../escape.jpg", "Original/../../escape.jpg", "/tmp/escape.jpg"])
def test_zip_refuses_escaping_entries(tmp_path: Path, entry: str) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("Original/Benign/ok.jpg", b"fine")
        zipped.writestr(entry, b"evil")
    with pytest.raises(DataError, match=f"{re.escape(str(archive))}.*{re.escape(repr(entry))}"):
        safe_extract_zip(archive, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    assert not (tmp_path / "escape.jpg").exists()


def test_zip_refuses_symlink_entry(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    link = zipfile.ZipInfo("Original/Benign/link.jpg")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(link, "/etc/passwd")
    with pytest.raises(DataError, match="'Original/Benign/link.jpg' \\(symbolic link\\)"):
        safe_extract_zip(archive, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_not_a_zip(tmp_path: Path) -> None:
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"<html>login required</html>")
    with pytest.raises(DataError, match=f"{re.escape(str(archive))}: not a valid zip archive"):
        safe_extract_zip(archive, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


# --- download ------------------------------------------------------------------------------------


class RangeHandler(BaseHTTPRequestHandler):
    """Serves ``server.payload`` at any path but /missing; honours Range unless told not to."""

    server: TestServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/missing":
            self.send_error(404)
            return
        self.server.ranges.append(self.headers.get("Range"))
        payload, start = self.server.payload, 0
        if self.headers.get("Range") and self.server.honour_range:
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            self.send_response(200)
        body = payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.cut_first and len(self.server.ranges) == 1:
            body = body[: len(body) // 2]  # then the connection closes: a short read
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class TestServer(ThreadingHTTPServer):
    __test__ = False  # not a test class for pytest
    payload = PAYLOAD
    honour_range = True
    cut_first = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.ranges: list[str | None] = []

    def url(self, path: str = "/archive.zip") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    httpd = TestServer()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download(tmp_path: Path, server: TestServer, download_params: DownloadParams) -> None:
    dest = download(server.url(), sha256(PAYLOAD), tmp_path / "dl" / "archive.zip", download_params)
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges == [None]

    download(server.url(), sha256(PAYLOAD), dest, download_params)  # already there: no request
    assert server.ranges == [None]


def test_download_resumes_after_cut_connection(
    tmp_path: Path, server: TestServer, download_params: DownloadParams
) -> None:
    server.cut_first = True
    dest = download(server.url(), sha256(PAYLOAD), tmp_path / "archive.zip", download_params)
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges == [None, f"bytes={len(PAYLOAD) // 2}-"]
    assert not (tmp_path / "archive.zip.part").exists()


def test_download_restarts_when_range_ignored(
    tmp_path: Path, server: TestServer, download_params: DownloadParams
) -> None:
    server.honour_range = False
    (tmp_path / "archive.zip.part").write_bytes(b"stale bytes from another file")
    dest = download(server.url(), sha256(PAYLOAD), tmp_path / "archive.zip", download_params)
    assert dest.read_bytes() == PAYLOAD
    assert server.ranges[0] is not None


def test_download_checksum_mismatch(tmp_path: Path, server: TestServer, download_params: DownloadParams) -> None:
    wrong = "0" * 64
    with pytest.raises(DataError, match=f"{re.escape(server.url())}.*expected sha256 {wrong}, got {sha256(PAYLOAD)}"):
        download(server.url(), wrong, tmp_path / "archive.zip", download_params)
    assert list(tmp_path.iterdir()) == []


def test_download_http_error_names_url(tmp_path: Path, server: TestServer, download_params: DownloadParams) -> None:
    with pytest.raises(DataError, match=f"{re.escape(server.url('/missing'))}.*HTTP 404"):
        download(server.url("/missing"), sha256(PAYLOAD), tmp_path / "archive.zip", download_params)


def test_download_gives_up_after_retries(tmp_path: Path, download_params: DownloadParams) -> None:
    with TestServer() as closed:  # bound, then closed: nothing listens on the port
        url = closed.url()
    with pytest.raises(DataError, match=f"{re.escape(url)}: download failed after 3 attempt"):
        download(url, sha256(PAYLOAD), tmp_path / "archive.zip", download_params)


# --- acquire end to end --------------------------------------------------------------------------


def check_outputs(workdir: Path, provenance, data_params: DataParams, root: Path) -> None:
    loaded_root, manifest, loaded = load_source(workdir)
    assert loaded == provenance
    assert loaded_root == root.resolve()
    assert manifest.equals(scan_dataset(root, data_params))
    assert provenance.n_images == len(manifest)
    assert provenance.fingerprint == fingerprint_of(manifest)
    source = read_json(workdir / "source.json")
    assert source["n_files"] == len(manifest)
    assert source["class_counts"] == manifest["label"].value_counts().reindex(CLASSES).to_dict()


def test_acquire_folder(
    tmp_path: Path, data_params: DataParams, download_params: DownloadParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_dataset(tmp_path / "data" / "leukemia")
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the current directory
    spec = DatasetSpec(source="folder", path="data")
    provenance = acquire("real", spec, data_params, download_params, tmp_path / "work")
    assert (provenance.dataset, provenance.source, provenance.location) == ("real", "folder", "data")
    assert provenance.n_images == 8
    assert not (tmp_path / "work" / "raw").exists()  # used in place
    check_outputs(tmp_path / "work", provenance, data_params, tmp_path / "data" / "leukemia")


def test_acquire_zip(tmp_path: Path, data_params: DataParams, download_params: DownloadParams) -> None:
    archive = zip_folder(make_dataset(tmp_path / "src"), tmp_path / "data.zip", prefix="leukemia/")
    spec = DatasetSpec(source="zip", path=str(archive))
    provenance = acquire("kaggle", spec, data_params, download_params, tmp_path / "work")
    assert (provenance.source, provenance.location, provenance.n_images) == ("zip", str(archive), 8)
    check_outputs(tmp_path / "work", provenance, data_params, tmp_path / "work" / "raw" / "leukemia")
    in_place = DatasetSpec(source="folder", path=str(tmp_path / "src"))
    same = acquire("kaggle", in_place, data_params, download_params, tmp_path / "w2")
    assert same.fingerprint == provenance.fingerprint  # same images, same fingerprint, whatever the source


def test_acquire_url(
    tmp_path: Path, server: TestServer, data_params: DataParams, download_params: DownloadParams
) -> None:
    buffer = io.BytesIO()
    zip_folder(make_dataset(tmp_path / "src"), buffer)
    server.payload = buffer.getvalue()
    spec = DatasetSpec(source="url", url=server.url(), sha256=sha256(server.payload))
    provenance = acquire("mirror", spec, data_params, download_params, tmp_path / "work")
    assert (provenance.source, provenance.location, provenance.n_images) == ("url", server.url(), 8)
    assert (tmp_path / "work" / "download" / "archive.zip").read_bytes() == server.payload
    check_outputs(tmp_path / "work", provenance, data_params, tmp_path / "work" / "raw")


def test_acquire_synthetic(tmp_path: Path, data_params: DataParams, download_params: DownloadParams) -> None:
    synthetic = SyntheticParams(images_per_class=3, image_size=48, n_sites=2, seed=7)
    spec = DatasetSpec(source="synthetic", synthetic=synthetic)
    provenance = acquire("synthetic", spec, data_params, download_params, tmp_path / "work")
    assert (provenance.source, provenance.location, provenance.n_images) == ("synthetic", "synthetic:seed=7", 12)
    assert provenance.is_synthetic
    check_outputs(tmp_path / "work", provenance, data_params, tmp_path / "work" / "raw")


def test_acquire_synthetic_needs_one_folder_per_class(
    tmp_path: Path, data_params: DataParams, download_params: DownloadParams
) -> None:
    two_for_pro = data_params.model_copy(update={"class_folders": {**data_params.class_folders, "Pro-2": "Pro"}})
    synthetic = SyntheticParams(images_per_class=1, image_size=32, n_sites=1, seed=0)
    spec = DatasetSpec(source="synthetic", synthetic=synthetic)
    with pytest.raises(DataError, match="data.class_folders.*one folder per class"):
        acquire("synthetic", spec, two_for_pro, download_params, tmp_path / "work")
