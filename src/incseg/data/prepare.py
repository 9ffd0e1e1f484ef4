"""``incseg data prepare``: download and arrange the public VOC / ADE20K archives.

Each archive is downloaded into the root (resuming a partial file with an HTTP range request),
checked against its known size and MD5 where published, or else against the server's
``Content-Length``, then extracted with tarfile's ``data`` filter (no absolute paths or links out
of the root). What is already extracted, or already downloaded and complete, is skipped. Without
network the error says which files to place where.

torchvision's ``download_and_extract_archive`` is not used for the transfer and extraction: it
cannot resume a partial download (the VOC archive is 2 GB) and extracts tar files without a
member filter; its MD5 check is used.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.utils import check_md5
from tqdm import tqdm

from incseg.data.layouts import standard_voc_list
from incseg.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    """One public archive: where it comes from, what it becomes under the root."""

    filename: str
    url: str
    done_marker: str  # path under the root that exists once the archive is in place
    size: int | None = None
    md5: str | None = None


ARCHIVES: dict[str, tuple[Archive, ...]] = {
    "voc": (
        Archive(
            "VOCtrainval_11-May-2012.tar",
            "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            "VOCdevkit/VOC2012/JPEGImages",
            md5="6cd6e144f989b92b3379bac3b3de84fd",
        ),
        Archive(
            "SegmentationClassAug.zip",
            "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1",
            "VOCdevkit/VOC2012/SegmentationClassAug",
        ),
    ),
    "ade": (
        Archive(
            "ADEChallengeData2016.zip",
            "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
            "ADEChallengeData2016/annotations",
        ),
    ),
}


def download(archive: Archive, dest: Path, *, progress: bool) -> None:
    """Fetch ``archive`` into ``dest``, resuming a partial download; verify size (and MD5)."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(
        archive.url, headers={"Range": f"bytes={have}-"} if have else {}
    )
    log.info(
        f"downloading {archive.url} -> {dest}" + (f" (resuming at {have} bytes)" if have else "")
    )
    try:
        response = urllib.request.urlopen(request, timeout=30)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DataError(
            f"cannot download {archive.url} ({reason}).\n{manual_instructions_for(archive, dest.parent)}"
        ) from None
    with response:
        resumed = getattr(response, "status", 200) == 206
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length else archive.size
        mode = "ab" if resumed else "wb"
        with (
            part.open(mode) as out,
            tqdm(
                total=total,
                initial=have if resumed else 0,
                unit="B",
                unit_scale=True,
                disable=not progress,
                desc=archive.filename,
            ) as bar,
        ):
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                bar.update(len(block))
    _verify(archive, part, total)
    part.replace(dest)


def manual_instructions_for(archive: Archive, root: Path) -> str:
    return (
        f"Without network, download it elsewhere and place it at {root / archive.filename}, "
        "then run the command again."
    )


def _verify(archive: Archive, path: Path, expected: int | None) -> None:
    size = path.stat().st_size
    expected = archive.size or expected
    if expected is not None and size != expected:
        raise DataError(
            f"{path}: {size} bytes, expected {expected}; run the command again to resume"
        )
    if archive.md5 is not None and not check_md5(path, archive.md5):
        raise DataError(
            f"{path}: MD5 differs from the published {archive.md5}; delete it and run again"
        )


def extract(path: Path, root: Path) -> None:
    """Extract a .tar or .zip archive into ``root`` (members may not leave it)."""
    log.info(f"extracting {path} into {root}")
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            tar.extractall(root, filter="data")
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                target = (root / member).resolve()
                if not target.is_relative_to(root.resolve()):
                    raise DataError(f"{path}: member {member!r} would be written outside {root}")
            zf.extractall(root)
    else:
        raise DataError(f"{path}: neither a tar nor a zip archive")


def _arrange_voc(root: Path) -> None:
    """Move a top-level ``SegmentationClassAug`` into VOC2012 and write the split lists."""
    voc = root / "VOCdevkit" / "VOC2012"
    loose = root / "SegmentationClassAug"
    if loose.is_dir() and not (voc / "SegmentationClassAug").exists():
        voc.mkdir(parents=True, exist_ok=True)
        shutil.move(str(loose), str(voc / "SegmentationClassAug"))
        log.info(f"moved {loose} -> {voc / 'SegmentationClassAug'}")
    shutil.rmtree(root / "__MACOSX", ignore_errors=True)
    lists = voc / "ImageSets" / "Segmentation"
    for name in ("train_aug", "val"):
        target = lists / f"{name}.txt"
        if voc.is_dir() and not target.exists():
            lists.mkdir(parents=True, exist_ok=True)
            target.write_text("\n".join(standard_voc_list(name)) + "\n")
            log.info(f"wrote {target} (standard list)")


def prepare(
    family: str,
    root: str | Path,
    *,
    progress: bool = True,
    archives: tuple[Archive, ...] | None = None,
) -> None:
    """Download (or reuse), verify, extract and arrange every archive of ``family`` under ``root``."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"--root {root}: cannot create it ({err.strerror})") from None
    for archive in archives or ARCHIVES[family]:
        if (root / archive.done_marker).exists():
            log.info(f"{archive.done_marker}: already in place, skipped")
            continue
        dest = root / archive.filename
        if dest.exists():
            log.info(f"{dest}: already downloaded")
            _verify(archive, dest, None)
        else:
            download(archive, dest, progress=progress)
        extract(dest, root)
    if family == "voc":
        _arrange_voc(root)
    log.info(
        f"{family} ready under {root}; check it with `incseg data check {family} --root {root}`"
    )
