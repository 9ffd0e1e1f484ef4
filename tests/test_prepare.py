"""``incseg data prepare``: download (file:// URLs stand in for the servers), verify, extract,
arrange; skip what is in place; a clear message without network."""

import hashlib
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
    monkeypatch.setitem(prep.ARCHIVES, "voc", archives)
    assert main(["data", "prepare", "voc", "--root", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "voc.tar: MD5 differs from the published 00000000" in err
    assert (root / "voc.tar").exists()  # the user's file is kept


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


def test_truncated_download_is_kept_for_resume(tmp_path):
    archives = _archives(tmp_path)
    wrong = prep.Archive(
        "aug.zip", archives[1].url, archives[1].done_marker, size=archives[1].size + 10
    )
    with pytest.raises(DataError, match=r"expected \d+; run the command again to resume"):
        prep.download(wrong, tmp_path / "aug.zip", progress=False)
    assert (tmp_path / "aug.zip.part").exists() and not (tmp_path / "aug.zip").exists()


def test_zip_members_may_not_escape_the_root(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../escape.txt", b"x")
    with pytest.raises(DataError, match="would be written outside"):
        prep.extract(bad, tmp_path / "root")
    assert not (tmp_path / "escape.txt").exists()
