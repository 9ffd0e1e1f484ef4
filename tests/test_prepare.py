"""``incseg data prepare``: download (file:// URLs stand in for the servers), verify, extract,
arrange; skip what is in place; a clear message without network."""

import hashlib
import io
import shutil
import tarfile
import zipfile

import pytest
from conftest import VOC_ROOT

from incseg.cli import main
from incseg.data import prepare as prep
from incseg.errors import DataError

VOC2012 = VOC_ROOT / "VOCdevkit" / "VOC2012"


def _archives(tmp_path, md5=None):
    """A VOC-like tar (images, no Aug labels) and a SegmentationClassAug zip, as file:// URLs."""
    src = tmp_path / "src"
    shutil.copytree(VOC2012 / "JPEGImages", src / "VOCdevkit" / "VOC2012" / "JPEGImages")
    tar_path = tmp_path / "server" / "voc.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:
        tar.add(src / "VOCdevkit", arcname="VOCdevkit")
    zip_path = tmp_path / "server" / "aug.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for png in sorted((VOC2012 / "SegmentationClassAug").glob("*.png")):
            zf.write(png, f"SegmentationClassAug/{png.name}")
        zf.writestr("__MACOSX/junk", b"x")
    digest = md5 or hashlib.md5(tar_path.read_bytes()).hexdigest()
    return (
        prep.Archive("voc.tar", tar_path.as_uri(), "VOCdevkit/VOC2012/JPEGImages", md5=digest),
        prep.Archive(
            "aug.zip",
            zip_path.as_uri(),
            "VOCdevkit/VOC2012/SegmentationClassAug",
            size=zip_path.stat().st_size,
        ),
    )


def test_prepare_downloads_extracts_arranges_then_skips(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(prep.ARCHIVES, "voc", _archives(tmp_path))
    root = tmp_path / "data"
    assert main(["data", "prepare", "voc", "--root", str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "downloading file://" in out and "extracting" in out
    voc = root / "VOCdevkit" / "VOC2012"
    assert len(list((voc / "SegmentationClassAug").glob("*.png"))) == 18
    assert not (root / "__MACOSX").exists() and not (root / "SegmentationClassAug").exists()
    assert len((voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()) == 10582
    assert main(["data", "prepare", "voc", "--root", str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("already in place, skipped") == 2 and "downloading" not in out


def test_prepare_reuses_a_placed_archive_and_checks_md5(tmp_path, monkeypatch, capsys):
    archives = _archives(tmp_path, md5="0" * 32)
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(tmp_path / "server" / "voc.tar", root / "voc.tar")  # placed by hand
    actual = hashlib.md5((root / "voc.tar").read_bytes()).hexdigest()
    monkeypatch.setitem(prep.ARCHIVES, "voc", archives)
    assert main(["data", "prepare", "voc", "--root", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'voc.tar'}: MD5 {actual}, expected {'0' * 32} (the published MD5" in err
    assert "the file is left in place: replace it" in err
    assert (root / "voc.tar").exists()  # the user's file is kept
    assert not (root / "VOCdevkit").exists()  # and not extracted


def test_prepare_without_network_says_where_to_put_files(tmp_path, monkeypatch, capsys):
    archive = prep.Archive(
        "ADEChallengeData2016.zip",
        "http://127.0.0.1:9/ADEChallengeData2016.zip",
        "ADEChallengeData2016/annotations",
    )
    monkeypatch.setitem(prep.ARCHIVES, "ade", (archive,))
    root = tmp_path / "ade"
    assert main(["data", "prepare", "ade", "--root", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot download http://127.0.0.1:9/ADEChallengeData2016.zip" in err
    assert f"place it at {root / 'ADEChallengeData2016.zip'}" in err


class _Response(io.BytesIO):
    """A stand-in for an HTTP response: ``body`` announced as ``length`` bytes."""

    def __init__(self, body, length, status=200):
        super().__init__(body)
        self.status = status
        self.headers = {"Content-Length": str(length)}


def test_every_fetched_archive_is_https_with_a_pinned_size_and_digest():
    for archives in prep.ARCHIVES.values():
        for archive in archives:
            assert archive.url.startswith("https://"), archive.url
            if archive.filename in prep.UNPINNED:
                continue
            assert archive.size is not None and archive.size > 0, archive.filename
            algorithm, value = archive.digest
            assert len(value) == {"md5": 32, "sha256": 64}[algorithm], archive.filename
            assert int(value, 16) >= 0
    # the one archive with no published checksum, named on purpose
    assert prep.UNPINNED == {"SegmentationClassAug.zip"}


def test_a_downloaded_archive_with_another_digest_is_moved_aside(tmp_path, monkeypatch, capsys):
    archives = _archives(tmp_path, md5="0" * 32)
    served = (tmp_path / "server" / "voc.tar").read_bytes()
    monkeypatch.setitem(prep.ARCHIVES, "voc", archives)
    root = tmp_path / "data"
    assert main(["data", "prepare", "voc", "--root", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err
    actual = hashlib.md5(served).hexdigest()
    assert f"voc.tar from {archives[0].url}: MD5 {actual}, expected {'0' * 32}" in err
    assert f"moved to {root / 'voc.tar.rejected'} (not deleted)" in err
    assert (root / "voc.tar.rejected").read_bytes() == served  # kept for inspection
    assert not (root / "voc.tar").exists() and not (root / "voc.tar.part").exists()
    assert not (root / "VOCdevkit").exists()


def test_a_placed_archive_of_the_wrong_size_is_refused_before_hashing(
    tmp_path, monkeypatch, capsys
):
    archives = _archives(tmp_path)
    sized = prep.Archive(
        "voc.tar",
        archives[0].url,
        archives[0].done_marker,
        size=(tmp_path / "server" / "voc.tar").stat().st_size,
        md5=archives[0].md5,
    )
    root = tmp_path / "data"
    root.mkdir()
    (root / "voc.tar").write_bytes((tmp_path / "server" / "voc.tar").read_bytes()[:1000])

    def no_hashing(path, algorithm):
        raise AssertionError("hashed before the size check")

    monkeypatch.setattr(prep, "_file_digest", no_hashing)
    monkeypatch.setitem(prep.ARCHIVES, "voc", (sized, archives[1]))
    assert main(["data", "prepare", "voc", "--root", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'voc.tar'}: 1000 bytes, expected {sized.size}" in err
    assert "rename it to voc.tar.part to resume it" in err
    assert (root / "voc.tar").stat().st_size == 1000  # left in place


def test_the_server_offering_another_size_is_refused_before_downloading(tmp_path):
    archives = _archives(tmp_path)
    wrong = prep.Archive(
        "aug.zip", archives[1].url, archives[1].done_marker, size=archives[1].size + 10
    )
    with pytest.raises(
        DataError,
        match=rf"the server offers {archives[1].size} bytes, expected {archives[1].size + 10} "
        r"\(the published size of aug.zip\); nothing was downloaded",
    ):
        prep.download(wrong, tmp_path / "aug.zip", progress=False)
    assert not (tmp_path / "aug.zip.part").exists() and not (tmp_path / "aug.zip").exists()


def test_a_short_transfer_is_kept_and_resumed(tmp_path, monkeypatch):
    body = bytes(range(256)) * 40
    archive = prep.Archive(
        "x.zip",
        "https://example.invalid/x.zip",
        "x",
        size=len(body),
        md5=hashlib.md5(body).hexdigest(),
    )
    requests = []

    def dropped(request, timeout):  # the connection drops after 1000 bytes
        requests.append(request.headers.get("Range"))
        return _Response(body[:1000], len(body))

    monkeypatch.setattr(prep.urllib.request, "urlopen", dropped)
    with pytest.raises(DataError, match="1000 bytes, expected 10240; the partial download is kept"):
        prep.download(archive, tmp_path / "x.zip", progress=False)
    assert (tmp_path / "x.zip.part").stat().st_size == 1000

    def rest(request, timeout):
        requests.append(request.headers.get("Range"))
        return _Response(body[1000:], len(body) - 1000, status=206)

    monkeypatch.setattr(prep.urllib.request, "urlopen", rest)
    prep.download(archive, tmp_path / "x.zip", progress=False)
    assert (tmp_path / "x.zip").read_bytes() == body and not (tmp_path / "x.zip.part").exists()
    assert requests == [None, "bytes=1000-"]


def test_a_complete_part_with_another_digest_is_rejected_without_a_request(tmp_path):
    archive = prep.Archive(
        "x.zip", "http://127.0.0.1:9/x.zip", "x", size=4, md5=hashlib.md5(b"good").hexdigest()
    )
    (tmp_path / "x.zip.part").write_bytes(b"evil")
    with pytest.raises(DataError, match=r"x.zip from http://127.0.0.1:9/x.zip: MD5 [0-9a-f]{32}, "):
        prep.download(archive, tmp_path / "x.zip", progress=False)
    assert (tmp_path / "x.zip.rejected").read_bytes() == b"evil"


def test_an_unpinned_archive_reports_its_sha256(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(prep.ARCHIVES, "voc", _archives(tmp_path))
    aug = (tmp_path / "server" / "aug.zip").read_bytes()
    assert main(["data", "prepare", "voc", "--root", str(tmp_path / "data"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    sha = hashlib.sha256(aug).hexdigest()
    assert f"no published checksum to compare with; SHA-256 {sha}, {len(aug)} bytes" in out


def test_zip_members_may_not_escape_the_root(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../escape.txt", b"x")
    with pytest.raises(DataError, match="would be written outside"):
        prep.extract(bad, tmp_path / "root")
    assert not (tmp_path / "escape.txt").exists()
