"""dataset.download: archives built here, served from 127.0.0.1, fetched, verified and placed atomically."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
from test_btad import make_btad
from test_visa import make_visa

from ad.data import BTAD, MVTecAD, VisA
from ad.data.download import MARKER, Archive, download_dataset, extract
from ad.data.synthetic import make_mvtec_layout
from ad.errors import ADError


class Server:
    """A local HTTP server over one folder that counts requests; ``/cut/<file>`` stops half-way through."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.requests, self.delay_s = folder, 0, 0.0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.requests += 1
                time.sleep(server.delay_s)
                cut = self.path.startswith("/cut/")
                path = server.folder / self.path.removeprefix("/cut/").lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if cut else body)
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def archive(self, name: str, folder: str | None = None) -> Archive:
        """The Archive entry for a file in the served folder, with its true checksum."""
        sha256 = hashlib.sha256((self.folder / name).read_bytes()).hexdigest()
        return Archive(url=f"{self.url}/{name}", sha256=sha256, folder=folder)


@pytest.fixture
def server(tmp_path: Path):
    served = tmp_path / "served"
    served.mkdir()
    running = Server(served)
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


def tar_of(folder: Path, destination: Path, arcname: str = ".") -> Path:
    """A gzipped tar of ``folder``, its contents at the archive's top level unless ``arcname`` says otherwise."""
    with tarfile.open(destination, "w:gz") as bundle:
        bundle.add(folder, arcname=arcname)
    return destination


def zip_of(folder: Path, destination: Path, prefix: str) -> Path:
    """A zip of ``folder`` with every member under ``prefix/`` (BTAD's archive has such a top folder)."""
    with zipfile.ZipFile(destination, "w") as bundle:
        for path in sorted(folder.rglob("*")):
            bundle.write(path, f"{prefix}/{path.relative_to(folder)}")
    return destination


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    """A small dataset tree in the MVTec layout (category ``widget``)."""
    return make_mvtec_layout(tmp_path / "payload", "widget", n_train=2, n_test_good=1, n_test_defect=1,
                             image_size=32, seed=0).parent


def leftovers(parent: Path, root: Path) -> list[str]:
    """Whatever a download into ``root`` left in ``parent`` besides its lock file."""
    return sorted(p.name for p in parent.iterdir() if p.name != f".{root.name}.download.lock")


def test_download_verifies_extracts_and_records(server: Server, payload: Path, tmp_path: Path) -> None:
    tar_of(payload, server.folder / "data.tar.gz")
    root = tmp_path / "data" / "MVTecAD"
    archive = server.archive("data.tar.gz")
    download_dataset(root, archive, present=root / "widget")
    assert sorted(p.relative_to(root) for p in root.rglob("*.png")) == sorted(
        p.relative_to(payload) for p in payload.rglob("*.png"))
    assert json.loads((root / MARKER).read_text())["sha256"] == archive.sha256
    assert leftovers(root.parent, root) == ["MVTecAD"]  # no temp folder, no archive
    assert server.requests == 1

    download_dataset(root, archive, present=root / "widget")  # idempotent: nothing fetched again
    assert server.requests == 1
    assert MVTecAD(root=str(root), category="widget", image_size=32).test


def test_bad_checksum_leaves_nothing(server: Server, payload: Path, tmp_path: Path) -> None:
    tar_of(payload, server.folder / "data.tar.gz")
    root = tmp_path / "data" / "MVTecAD"
    wrong = Archive(url=f"{server.url}/data.tar.gz", sha256="0" * 64)
    with pytest.raises(ADError, match=r"dataset\.archive\.sha256: .* expected 0{64}"):
        download_dataset(root, wrong, present=root / "widget")
    assert leftovers(root.parent, root) == []


def test_interrupted_download_leaves_nothing(server: Server, payload: Path, tmp_path: Path) -> None:
    tar_of(payload, server.folder / "data.tar.gz")
    root = tmp_path / "data" / "MVTecAD"
    archive = server.archive("data.tar.gz")
    cut = Archive(url=f"{server.url}/cut/data.tar.gz", sha256=archive.sha256)
    with pytest.raises(ADError, match="cut off after"):
        download_dataset(root, cut, present=root / "widget")
    assert leftovers(root.parent, root) == []
    download_dataset(root, archive, present=root / "widget")  # a retry then works
    assert (root / "widget" / "train" / "good").is_dir()


def test_unreachable_url_is_one_clear_error(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "data" / "MVTecAD"
    with pytest.raises(ADError, match=r"dataset\.archive\.url: downloading .*missing\.tar failed"):
        download_dataset(root, Archive(url=f"{server.url}/missing.tar", sha256="0" * 64), present=root / "x")
    assert leftovers(root.parent, root) == []


def evil_tar(destination: Path, member: tarfile.TarInfo) -> Path:
    """A tar with one harmless file and one hostile ``member``."""
    with tarfile.open(destination, "w") as bundle:
        good = tarfile.TarInfo("widget/ok.txt")
        good.size = 2
        bundle.addfile(good, io.BytesIO(b"ok"))
        if member.isfile():
            member.size = 4
        bundle.addfile(member, io.BytesIO(b"evil") if member.isfile() else None)
    return destination


def symlink(name: str, target: str) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = tarfile.SYMTYPE, target
    return member


def hardlink(name: str, target: str) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = tarfile.LNKTYPE, target
    return member


@pytest.mark.parametrize(
    "member",
    [tarfile.TarInfo("../evil.txt"), tarfile.TarInfo("/tmp/evil.txt"), tarfile.TarInfo("widget/../../evil.txt"),
     symlink("widget/link", "../../outside"), symlink("widget/abs", "/etc/passwd"), hardlink("widget/hard", "../x")],
    ids=["parent", "absolute", "nested-parent", "symlink-out", "symlink-absolute", "hardlink-out"],
)
def test_tar_members_outside_the_folder_are_rejected(server: Server, tmp_path: Path, member) -> None:
    evil_tar(server.folder / "evil.tar", member)
    root = tmp_path / "data" / "root"
    with pytest.raises(ADError, match=r"dataset\.archive: member .*outside the dataset folder"):
        download_dataset(root, server.archive("evil.tar"), present=root / "widget")
    assert leftovers(root.parent, root) == []
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "evil.txt").exists()


def test_zip_member_outside_the_folder_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("widget/ok.txt", "ok")
        bundle.writestr("../evil.txt", "evil")
    with pytest.raises(ADError, match=r"member '\.\./evil\.txt' would be written outside"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not any((tmp_path / "out").iterdir())


def test_a_device_member_is_rejected(tmp_path: Path) -> None:
    device = tarfile.TarInfo("widget/dev")
    device.type = tarfile.CHRTYPE
    with pytest.raises(ADError, match="device or pipe"):
        extract(evil_tar(tmp_path / "dev.tar", device), tmp_path / "out")


def test_btad_download_takes_the_archive_folder_and_keeps_bmp(server: Server, tmp_path: Path) -> None:
    tree = make_btad(tmp_path / "tree", categories=("01",))
    zip_of(tree, server.folder / "btad.zip", prefix="BTech_Dataset_transformed")
    archive = server.archive("btad.zip", folder="BTech_Dataset_transformed")
    config = {"url": archive.url, "sha256": archive.sha256, "folder": archive.folder}
    dataset = BTAD(root=str(tmp_path / "BTAD"), category="01", image_size=32, download=True, archive=config)
    assert {s.image.suffix for s in dataset.train} == {".bmp"} and len(dataset.test) == 6
    assert leftovers(tmp_path, tmp_path / "BTAD") == ["BTAD", "served", "tree"]


def test_visa_download_is_recognised_by_its_split_file(server: Server, tmp_path: Path) -> None:
    tar_of(make_visa(tmp_path / "tree"), server.folder / "VisA.tar")
    archive = server.archive("VisA.tar")
    config = {"url": archive.url, "sha256": archive.sha256, "folder": None}
    for _ in range(2):  # the second dataset finds the split file and downloads nothing
        dataset = VisA(root=str(tmp_path / "VisA"), category="pcb1", image_size=32, download=True, archive=config)
    assert len(dataset.train) == 8 and server.requests == 1


def test_wrong_archive_folder_names_what_is_there(server: Server, payload: Path, tmp_path: Path) -> None:
    tar_of(payload, server.folder / "data.tar.gz")
    root = tmp_path / "data" / "root"
    with pytest.raises(ADError, match=r"dataset\.archive\.folder: 'nope' is not in the archive \(top level: widget"):
        download_dataset(root, server.archive("data.tar.gz", folder="nope"), present=root / "widget")
    assert leftovers(root.parent, root) == []


def test_existing_data_is_used_and_foreign_folders_are_not_touched(server: Server, payload: Path,
                                                                   tmp_path: Path) -> None:
    tar_of(payload, server.folder / "data.tar.gz")
    archive = server.archive("data.tar.gz")
    download_dataset(payload, archive, present=payload / "widget")  # put there by hand: used as is
    other = tmp_path / "other"
    (other / "notes").mkdir(parents=True)
    with pytest.raises(ADError, match=r"dataset\.root: '.*other' exists and is not empty but has no 'widget'"):
        download_dataset(other, archive, present=other / "widget")
    assert server.requests == 0 and sorted(p.name for p in other.iterdir()) == ["notes"]
    empty = tmp_path / "empty"
    empty.mkdir()
    download_dataset(empty, archive, present=empty / "widget")  # an empty folder is filled
    assert (empty / "widget").is_dir() and server.requests == 1


def test_concurrent_jobs_download_once(server: Server, payload: Path, tmp_path: Path) -> None:
    tar_of(payload, server.folder / "data.tar.gz")
    server.delay_s = 0.3  # both jobs are waiting while the first download is in flight
    root = tmp_path / "data" / "MVTecAD"
    archive, errors = server.archive("data.tar.gz"), []

    def job() -> None:
        try:
            download_dataset(root, archive, present=root / "widget")
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=job) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and server.requests == 1 and (root / "widget").is_dir()


def test_stale_temp_folder_of_a_killed_download_is_removed(server: Server, payload: Path, tmp_path: Path) -> None:
    tar_of(payload, server.folder / "data.tar.gz")
    root = tmp_path / "data" / "MVTecAD"
    (tmp_path / "data" / ".MVTecAD.download-killed" / "extracted").mkdir(parents=True)
    download_dataset(root, server.archive("data.tar.gz"), present=root / "widget")
    assert leftovers(root.parent, root) == ["MVTecAD"]


def test_unknown_category_fails_before_downloading(server: Server, payload: Path, tmp_path: Path) -> None:
    tar_of(payload, server.folder / "data.tar.gz")
    archive = server.archive("data.tar.gz")
    config = {"url": archive.url, "sha256": archive.sha256}
    message = r"dataset\.category: 'botle' is not a category of MVTec AD; did you mean 'bottle'\? valid: bottle, cable"
    with pytest.raises(ADError, match=message):
        MVTecAD(root=str(tmp_path / "m"), category="botle", categories=["bottle", "cable"], download=True,
                archive=config)
    assert server.requests == 0 and not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("config", "key"),
    [({"sha256": "0" * 64}, "url"), ({"url": "http://x/a.tar", "sha256": "abc"}, "sha256"),
     ({"url": "http://x/a.tar", "sha256": "0" * 64, "md5": "x"}, "md5")],
)
def test_bad_archive_config_is_named(config: dict, key: str) -> None:
    with pytest.raises(ADError, match=rf"dataset\.archive\.{key}"):
        Archive.from_config(config)
