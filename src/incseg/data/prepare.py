"""``incseg data prepare``: download and arrange the public VOC / ADE20K archives.

Each archive is downloaded into the root over HTTPS (resuming a partial ``NAME.part`` file with
an HTTP range request), then checked: first its size against the published size (before any
hashing, and before the transfer when the server announces another size), then its digest
against the published MD5 or SHA-256. Every pinned value names its public source next to it in
:data:`ARCHIVES`. Extraction uses tarfile's ``data`` filter (no absolute paths or links out of
the root). What is already extracted, or already downloaded and complete, is skipped. Without
network the error says which file to place where, with its size and digest.

A mismatch never deletes a file. A download with the wrong digest (or more bytes than published)
is moved to ``NAME.rejected`` so that the next run downloads afresh; a short download stays
``NAME.part`` and the next run resumes it; a file the user placed at ``NAME`` stays where it is
and the message says what to do with it.

``SegmentationClassAug.zip`` (DrSleep's Dropbox copy, the file MiB and PLOP point to) has no
published size or checksum that we could find; it is checked against the server's
``Content-Length`` only, and its SHA-256 and size are printed so that a copy can be compared with
a trusted one (:data:`UNPINNED` lists it; a test keeps every other archive pinned).

torchvision's ``download_and_extract_archive`` is not used: it cannot resume a partial download
(the VOC archive is 2 GB) and extracts tar files without a member filter.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from incseg.data.layouts import standard_voc_list
from incseg.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    """One public archive: where it comes from, what it becomes under the root, and its
    published size and digest (``None`` where none is published)."""

    filename: str
    url: str
    done_marker: str  # path under the root that exists once the archive is in place
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None

    @property
    def digest(self) -> tuple[str, str] | None:
        """``(algorithm, hex digest)`` to check, the stronger one when both are pinned."""
        if self.sha256 is not None:
            return "sha256", self.sha256.lower()
        if self.md5 is not None:
            return "md5", self.md5.lower()
        return None


ARCHIVES: dict[str, tuple[Archive, ...]] = {
    "voc": (
        Archive(
            "VOCtrainval_11-May-2012.tar",
            # Oxford's HTTPS host; public download scripts note that the older
            # http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ URL redirects there.
            "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            "VOCdevkit/VOC2012/JPEGImages",
            # size: the Oxford server's Content-Length, as recorded in public wget and Keras
            # download logs ("saved [1999639040/1999639040]").
            size=1_999_639_040,
            # MD5: torchvision, torchvision/datasets/voc.py (DATASET_YEAR_DICT["2012"]).
            md5="6cd6e144f989b92b3379bac3b3de84fd",
        ),
        Archive(
            "SegmentationClassAug.zip",
            # DrSleep's Dropbox copy (tensorflow-deeplab-resnet), already HTTPS. No published size
            # or checksum found: see UNPINNED.
            "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1",
            "VOCdevkit/VOC2012/SegmentationClassAug",
        ),
    ),
    "ade": (
        Archive(
            "ADEChallengeData2016.zip",
            # MIT CSAIL serves the same path over HTTPS (used by public download scripts).
            "https://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
            "ADEChallengeData2016/annotations",
            # size: 967,382,037 bytes as listed in a public project's dataset log; agrees with the
            # "967MB" / "~922 MB" (MiB) that other public READMEs give for this URL.
            size=967_382_037,
            # MD5: paperswithcode/torchbench, torchbench/datasets/ade20k.py (ARCHIVE_DICT). For
            # the same URL dmlc/gluon-cv, scripts/datasets/ade20k.py pins the SHA-1
            # 219e1696abb36c8ba3a3afe7fb2f4b4606a897c7 (not checked here).
            md5="7328b3957e407ddae1d3cbf487f149ef",
        ),
    ),
}

# Archives fetched without a published size and digest (none could be found); every other
# archive in ARCHIVES must pin both (tests/test_prepare.py checks it).
UNPINNED = frozenset({"SegmentationClassAug.zip"})


def _expected(archive: Archive) -> str:
    """``1999639040 bytes, MD5 6cd6...`` (what is known about the archive), for messages."""
    parts = [f"{archive.size} bytes"] if archive.size is not None else []
    if archive.digest is not None:
        algorithm, value = archive.digest
        parts.append(f"{algorithm.upper()} {value}")
    return ", ".join(parts)


def download(archive: Archive, dest: Path, *, progress: bool) -> None:
    """Fetch ``archive`` into ``dest`` through ``dest.part`` (resumed if present); verify size,
    then digest, before renaming it to ``dest``."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if archive.size is not None and have >= archive.size:  # complete (or too long): no request
        _verify(archive, part, None, downloaded=True)
        part.replace(dest)
        return
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
        offered = (int(length) + (have if resumed else 0)) if length else None
        if archive.size is not None and offered is not None and offered != archive.size:
            raise DataError(
                f"{archive.url}: the server offers {offered} bytes, expected {archive.size} (the "
                f"published size of {archive.filename}); nothing was downloaded.\n"
                + manual_instructions_for(archive, dest.parent)
            )
        total = offered if offered is not None else archive.size
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
    _verify(archive, part, total, downloaded=True)
    part.replace(dest)


def manual_instructions_for(archive: Archive, root: Path) -> str:
    known = _expected(archive)
    return (
        f"Without network, download it elsewhere ({archive.url}) and place it at "
        f"{root / archive.filename}" + (f" ({known})" if known else "") + ", then run the command "
        "again."
    )


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _reject(path: Path, archive: Archive) -> Path:
    """Move a bad download aside (never delete it) so that the next run starts afresh."""
    rejected = path.with_name(archive.filename + ".rejected")
    path.replace(rejected)
    return rejected


def _verify(archive: Archive, path: Path, announced: int | None, *, downloaded: bool) -> None:
    """Check ``path`` (a download, or a file the user placed) against the published size, then
    the published digest; raise a :class:`DataError` saying what happened to the file."""
    size = path.stat().st_size
    expected = archive.size if archive.size is not None else announced
    if expected is not None and size != expected:
        if downloaded and size < expected:
            raise DataError(
                f"{path}: {size} bytes, expected {expected}; the partial download is kept, run "
                "the command again to resume it"
            )
        if downloaded:
            rejected = _reject(path, archive)
            raise DataError(
                f"{archive.filename} from {archive.url}: {size} bytes, expected {expected}; the "
                f"download was moved to {rejected} (not deleted); run the command again to "
                "download it afresh"
            )
        raise DataError(
            f"{path}: {size} bytes, expected {expected} (the published size of "
            f"{archive.filename}); the file is left in place. If it is an incomplete download, "
            f"rename it to {path.name}.part to resume it; otherwise replace or delete it; then "
            "run the command again"
        )
    if archive.digest is None:
        sha256 = _file_digest(path, "sha256")
        log.info(
            f"{path}: no published checksum to compare with; SHA-256 {sha256}, {size} bytes "
            "(compare them with a trusted copy)"
        )
        return
    algorithm, wanted = archive.digest
    log.info(f"checking the {algorithm.upper()} of {path} ({size} bytes)")
    actual = _file_digest(path, algorithm)
    if actual == wanted:
        return
    name = algorithm.upper()
    if downloaded:
        rejected = _reject(path, archive)
        raise DataError(
            f"{archive.filename} from {archive.url}: {name} {actual}, expected {wanted} (the "
            f"published {name}); the download was moved to {rejected} (not deleted); run the "
            "command again to download it afresh"
        )
    raise DataError(
        f"{path}: {name} {actual}, expected {wanted} (the published {name} of "
        f"{archive.filename}); the file is left in place: replace it with the published archive "
        "(or delete it to have it downloaded) and run the command again"
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
            _verify(archive, dest, None, downloaded=False)
        else:
            download(archive, dest, progress=progress)
        extract(dest, root)
    if family == "voc":
        _arrange_voc(root)
    log.info(
        f"{family} ready under {root}; check it with `incseg data check {family} --root {root}`"
    )
