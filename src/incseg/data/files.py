"""Image / label pairs stored as files (Pascal VOC, ADE20K) and their cached class index.

Labels are PNGs holding class ids directly: VOC palette PNGs (mode ``P``, the palette index is the
class, 0..20 and 255 = void) and ADE20K grey PNGs (mode ``L``, 0..150, 0 = "other"). They are read
with PIL *without* palette conversion. Images are JPEGs decoded by PIL to uint8 RGB.

The class index (``(N, 256)`` bool, :mod:`incseg.protocol.selection`) is built by reading only the
label PNGs, in worker processes, and cached on disk under a key made of the label file names,
sizes and modification times, so it is rebuilt only when the labels change.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from incseg.errors import DataError
from incseg.protocol.selection import NUM_LABEL_VALUES

log = logging.getLogger(__name__)

CACHE_ENV = "INCSEG_CACHE"
PARALLEL_MIN = 256  # below this many labels, worker start-up costs more than it saves


def cache_dir() -> Path:
    """``$INCSEG_CACHE``, else ``$XDG_CACHE_HOME/incseg``, else ``~/.cache/incseg``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "incseg"


def read_label(path: Path) -> np.ndarray:
    """``(H, W)`` uint8 class ids of a label PNG (palette indices, not colours)."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise DataError(
                f"{path}: label mode is {img.mode}, expected a palette (P) or grey (L) PNG of class ids"
            )
        return np.array(img, dtype=np.uint8)


SALIENCY_SOURCE = (
    "SSUL's release: https://github.com/clovaai/SSUL/releases/download/preparation/saliency_map.zip "
    "(one PNG per image id)"
)


def read_saliency(path: Path) -> np.ndarray:
    """``(H, W)`` uint8 saliency map of a PNG, read as SSUL's code reads it (only ``> 0``
    matters to SSUL).

    The official code opens the map with no conversion (clovaai/SSUL datasets/voc.py:123,
    ``Image.open(self.sal_maps[index])``) and makes it an array with
    ``np.array(sal, dtype='uint8')`` (utils/ext_transforms.py:303): a grey (``L``) map gives its
    grey values, a palette (``P``) map its palette indices (not the colours), a bilevel (``1``)
    map 0 / 1. A map with several channels (``RGB``, ``RGBA``, ``LA``, ``PA``) gives an
    ``(H, W, C)`` array there, which its ``(target == 1) & (sal_map > 0)`` (datasets/voc.py:140)
    cannot combine with the ``(H, W)`` label: it is refused, not converted. A single channel of
    more than 8 bits (``I;16``, ``I``) is read the same way when its values fit in 0..255 and
    refused otherwise (the official cast to uint8 would wrap them round: 256 becomes 0).

    Raises:
        DataError: a missing or undecodable file, several channels, or values past 255.
    """
    try:
        with Image.open(path) as img:
            mode, channels = img.mode, len(img.getbands())
            wide = np.array(img) if channels == 1 else None
    except FileNotFoundError:
        raise DataError(
            f"saliency map {path} is missing; the maps come from {SALIENCY_SOURCE}"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot decode saliency map ({err})") from None
    if wide is None:
        raise DataError(
            f"{path}: saliency map has {channels} channels (mode {mode}); SSUL reads a map "
            "unconverted and needs one channel (clovaai/SSUL datasets/voc.py:123, 140): save it "
            "as a grey (L) or palette (P) PNG, e.g. Image.open(p).convert('L').save(p)"
        )
    if wide.size and (wide.min() < 0 or wide.max() > 255):
        raise DataError(
            f"{path}: saliency map (mode {mode}) holds values {wide.min()}..{wide.max()}; SSUL "
            "casts a map to uint8 (clovaai/SSUL utils/ext_transforms.py:303), which wraps values "
            "past 255 round: save it as an 8-bit grey (L) PNG of 0..255"
        )
    return wide.astype(np.uint8)


def read_image(path: Path) -> torch.Tensor:
    """``(3, H, W)`` uint8 RGB image (grey JPEGs are expanded to three channels)."""
    try:
        with Image.open(path) as img:
            array = np.array(img.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot decode image ({err})") from None
    return torch.from_numpy(array).permute(2, 0, 1)


def _presence_row(path: str) -> np.ndarray:
    label = read_label(Path(path))
    return np.bincount(label.ravel(), minlength=NUM_LABEL_VALUES) > 0


def parallel_map(fn, items: Sequence, *, desc: str, unit: str, progress: bool, chunksize: int = 64):
    """Yield ``fn(item)`` in order, in worker processes (up to 8) when there are at least
    ``PARALLEL_MIN`` items, in this process otherwise; with a progress bar."""
    workers = 0 if len(items) < PARALLEL_MIN else min(8, os.cpu_count() or 1)
    with tqdm(total=len(items), desc=desc, unit=unit, disable=not progress, leave=False) as bar:
        if workers:
            with ProcessPoolExecutor(workers) as pool:
                for result in pool.map(fn, items, chunksize=chunksize):
                    bar.update()
                    yield result
        else:
            for item in items:
                result = fn(item)
                bar.update()
                yield result


def scan_labels(
    paths: Sequence[Path], *, desc: str = "class index", progress: bool = True
) -> np.ndarray:
    """``(N, 256)`` bool presence of every label value in each label file (no caching)."""
    rows = list(
        parallel_map(
            _presence_row, [str(p) for p in paths], desc=desc, unit="label", progress=progress
        )
    )
    return np.stack(rows) if rows else np.zeros((0, NUM_LABEL_VALUES), dtype=bool)


def index_key(paths: Sequence[Path]) -> str:
    """Cache key of a label list: hash of every file's name, size and modification time."""
    digest = hashlib.sha256()
    for path in paths:
        st = path.stat()
        digest.update(f"{path.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _cache_path(paths: Sequence[Path], tag: str) -> Path:
    return cache_dir() / f"{tag}-{index_key(paths)}.npy"


def store_index(paths: Sequence[Path], tag: str, presence: np.ndarray) -> None:
    """Write ``presence`` to the cache (atomically); a cache that cannot be written is skipped
    with a note."""
    path = _cache_path(paths, tag)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            np.save(tmp, np.packbits(presence, axis=1))
        os.replace(tmp.name, path)
    except OSError as err:
        log.warning(
            f"note: class index not cached ({path.parent}: {err.strerror}); set {CACHE_ENV} to a writable folder"
        )


def cached_index(paths: Sequence[Path], tag: str, *, progress: bool = True) -> np.ndarray:
    """:func:`scan_labels`, cached in :func:`cache_dir` as ``{tag}-{key}.npy`` (packed bits)."""
    path = _cache_path(paths, tag)
    if path.is_file():
        try:
            packed = np.load(path)
            if packed.shape == (len(paths), NUM_LABEL_VALUES // 8):
                return np.unpackbits(packed, axis=1).astype(bool)
        except (OSError, ValueError):
            pass  # unreadable cache: rebuild it
    presence = scan_labels(paths, desc=f"class index ({tag})", progress=progress)
    store_index(paths, tag, presence)
    return presence


@dataclass
class FileSource:
    """All image / label pairs of one split of a dataset on disk.

    Attributes:
        names: image ids, sorted (``2007_000032``, ``ADE_train_00000001``).
        images, labels: file paths, aligned with ``names``.
        tag: cache tag of the class index, e.g. ``voc-train``.
    """

    names: list[str]
    images: list[Path]
    labels: list[Path]
    tag: str
    progress: bool = True
    fixed_size: bool = False  # images differ in size: full-image evaluation needs batch size 1
    saliency_dir: Path | None = None  # data.saliency: ``<id>.png`` per image (train split)

    def __post_init__(self) -> None:
        missing = [p for p in (*self.images, *self.labels) if not p.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:5])
            raise DataError(
                f"{len(missing)} file(s) of the {self.tag} list are missing, e.g. {shown}; "
                "run `incseg data check` for a full report"
            )

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(3, H, W)`` uint8 image and ``(H, W)`` uint8 label with original class ids."""
        image = read_image(self.images[index])
        label = torch.from_numpy(read_label(self.labels[index]))
        if image.shape[1:] != label.shape:
            raise DataError(
                f"{self.images[index]}: image size {tuple(image.shape[1:])} differs from its label "
                f"{self.labels[index]} {tuple(label.shape)}"
            )
        return image, label

    def saliency(self, index: int) -> torch.Tensor:
        """``(H, W)`` uint8 saliency map of image ``index`` (``data.saliency``)."""
        if self.saliency_dir is None:
            raise DataError(
                f"the {self.tag} images have no saliency maps: set data.saliency to the folder of "
                f"{SALIENCY_SOURCE}"
            )
        sal = torch.from_numpy(read_saliency(self.saliency_dir / f"{self.names[index]}.png"))
        if sal.shape != read_label(self.labels[index]).shape:
            raise DataError(
                f"{self.saliency_dir / self.names[index]}.png: size {tuple(sal.shape)} differs "
                f"from its label {self.labels[index]}"
            )
        return sal

    def check_saliency(self, indices: Sequence[int]) -> None:
        """Stop before training when ``data.saliency`` is unset, not a folder, or lacks a map of
        one of ``indices``; the message names the paths and where the maps come from."""
        folder = self.saliency_dir
        if folder is None or not folder.is_dir():
            what = (
                "data.saliency is not set"
                if folder is None
                else f"data.saliency {folder} is not a folder"
            )
            raise DataError(f"{what}; this method needs the saliency maps of {SALIENCY_SOURCE}")
        missing = [folder / f"{self.names[i]}.png" for i in indices]
        missing = [p for p in missing if not p.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:3])
            raise DataError(
                f"{len(missing)} saliency map(s) missing in {folder}, e.g. {shown}; the maps come "
                f"from {SALIENCY_SOURCE}"
            )

    def presence(self) -> np.ndarray:
        """``(N, 256)`` bool class-presence index, from the on-disk cache when it is current."""
        if not hasattr(self, "_presence"):
            self._presence = cached_index(self.labels, self.tag, progress=self.progress)
        return self._presence
