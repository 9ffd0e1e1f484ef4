"""``incseg predict``: segment images with a saved step and write palette masks and overlays.

Masks hold *dataset* class ids (the model's channel k is class ``order[k]`` of its step), written
as palette PNGs with the standard VOC colour map, so they open like the dataset's own labels.
Overlays put the image and the image blended with the coloured mask side by side, as lossless
PNGs.

Output names: an image ``NAME.EXT`` gives ``NAME.png`` (mask) and ``NAME_overlay.png`` (overlay)
in the ``--out`` folder. Nothing is ever written over a file: before anything is written, the
command refuses

- an ``--out`` that exists and is not a folder;
- an output that would be one of the input images (``photo.png --out`` its own folder);
- two outputs with one name (``a.png a.jpg``, or ``x/a.png y/a.png``), compared ignoring case,
  as macOS and Windows file systems do;
- outputs that already exist in ``--out`` (all of them are listed).

Files are then created exclusively, so one that appears meanwhile is not overwritten either.

Images are read as 8-bit RGB: grey, grey with alpha, palette, RGBA and CMYK images are converted
(alpha is dropped: transparent pixels keep their stored colour); 16-bit grey images (PIL modes
``I;16*``, or ``I`` with values 0..65535) keep their top 8 bits (``value >> 8``); other pixel
formats (floating point, 32-bit values beyond 65535) are refused. Every image is read before
anything is written, so an unreadable one stops the command with nothing written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from incseg.data.transforms import test_transform
from incseg.engine.evaluate import predict_channels
from incseg.engine.model_io import restore_step
from incseg.engine.runtime import Runtime
from incseg.errors import DataError
from incseg.protocol.choices import IGNORE_INDEX

log = logging.getLogger(__name__)

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
LISTED = 10  # existing outputs named in the message; the rest are counted


def color_map(n: int = 256) -> np.ndarray:
    """``(n, 3)`` uint8 colours of the Pascal VOC palette (class 0 black, 255 cream for void):
    the bits of the class id are spread over the high bits of R, G and B."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def output_names(image: Path) -> tuple[str, str]:
    """File names of the mask and the overlay of ``image``."""
    return f"{image.stem}.png", f"{image.stem}_overlay.png"


def _rgb_array(img: Image.Image, path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB pixels of an opened image (see the module docstring)."""
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(img)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(
                f"{path}: 32-bit integer pixels from {values.min()} to {values.max()}; "
                "expected 8-bit or 16-bit (0..65535) values"
            )
        grey = (values.astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        raise DataError(
            f"{path}: floating-point pixels (PIL mode F); expected an 8-bit or 16-bit image"
        )
    try:
        return np.array(img.convert("RGB"), dtype=np.uint8)
    except ValueError as err:  # a mode PIL cannot convert to RGB
        raise DataError(
            f"{path}: pixel format {mode} cannot be converted to RGB ({err}); expected a grey, "
            "RGB, RGBA, palette or CMYK image"
        ) from None


def load_image(path: Path) -> torch.Tensor:
    """``(3, H, W)`` uint8 RGB image, or a :class:`DataError` naming ``path`` and what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected an image file")
    if not path.is_file():
        raise DataError(f"{path}: no such image")
    try:
        with Image.open(path) as img:
            array = _rgb_array(img, path)
    except Image.DecompressionBombError as err:
        raise DataError(_too_large(path, str(err))) from None
    except UnidentifiedImageError:
        raise DataError(
            f"{path}: not an image file PIL can read (expected PNG, JPEG or another format "
            "Pillow opens)"
        ) from None
    except PermissionError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise DataError(f"{path}: truncated or corrupt image file ({err})") from None
    return torch.from_numpy(array).permute(2, 0, 1)


def _too_large(path: Path, pil_message: str) -> str:
    """The message for an image over PIL's decompression-bomb limit (PIL names pixel counts)."""
    numbers = [int(n) for n in re.findall(r"\d+", pil_message)]
    if len(numbers) >= 2:
        pixels, limit = numbers[0], numbers[1]
        size = f"{pixels} pixels ({pixels / 1e6:.0f} megapixels)"
        over = f"over the limit of {limit} pixels ({limit / 1e6:.0f} megapixels)"
    else:
        size, over = "too many pixels", f"over PIL's limit ({pil_message})"
    return (
        f"{path}: {size}, {over} that PIL opens as a guard against decompression bombs; "
        "downscale the image (or tile it) and predict the smaller images"
    )


def _check_outputs(images: Sequence[Path], out: Path) -> list[tuple[Path, Path]]:
    """``(mask, overlay)`` paths of every image, after refusing every way of writing over a file
    (see the module docstring). Nothing is written here."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file, expected a folder (created if missing)")
    inputs: dict[Path, Path] = {}
    for path in images:
        key = Path(path).resolve()
        if key in inputs:
            raise DataError(f"{path}: given twice (as {inputs[key]} and {path})")
        inputs[key] = Path(path)
    plans = []
    by_name: dict[str, tuple[Path, str]] = {}
    for path in images:
        pair = []
        for name, kind in zip(output_names(Path(path)), ("mask", "overlay"), strict=True):
            target = out / name
            seen = by_name.setdefault(name.casefold(), (Path(path), kind))
            if seen[0] != Path(path):
                raise DataError(
                    f"the {seen[1]} of {seen[0]} and the {kind} of {path} would both be "
                    f"{out / name}: outputs are named after the image name without its extension "
                    "(NAME.png, NAME_overlay.png); predict them into different --out folders or "
                    "rename one"
                )
            source = inputs.get(target.resolve())
            if source is None and target.exists():
                source = next((p for p in inputs.values() if target.samefile(p)), None)
            if source is not None:
                whose = "the image itself" if source == Path(path) else f"the input image {source}"
                raise DataError(
                    f"{path}: its {kind} {target} would overwrite {whose}; choose an --out folder "
                    "other than the images' folder"
                )
            pair.append(target)
        plans.append((pair[0], pair[1]))
    existing = [p for pair in plans for p in pair if p.exists()]
    if existing:
        names = ", ".join(p.name for p in existing[:LISTED])
        more = f" and {len(existing) - LISTED} more" if len(existing) > LISTED else ""
        raise DataError(
            f"--out {out}: {len(existing)} output file(s) already exist and are never "
            f"overwritten: {names}{more}; choose another --out folder or remove them"
        )
    return plans


def _write_png(image: Image.Image, path: Path) -> None:
    """Save ``image`` as PNG into a file that must not exist yet (exclusive create)."""
    try:
        with path.open("xb") as f:
            image.save(f, format="PNG")
    except FileExistsError:
        raise DataError(f"{path}: appeared while predicting; it is not overwritten") from None
    except OSError as err:
        path.unlink(missing_ok=True)  # our own partial file
        raise DataError(f"{path}: cannot write it ({err.strerror or err})") from None


@torch.no_grad()
def predict_images(checkpoint: dict, images: Sequence[Path], out: Path) -> list[Path]:
    """Write ``NAME.png`` (mask) and ``NAME_overlay.png`` into ``out`` for every image; returns
    the written files (mask, overlay, mask, ...).

    Output names and images are checked, and every image read, before anything is written.
    """
    out = Path(out)
    images = [Path(p) for p in images]
    for path in images:  # a missing image is named before any output clash
        if not path.is_file():
            load_image(path)  # raises the message for a folder or a missing file
    plans = _check_outputs(images, out)
    decoded = [load_image(path) for path in images]
    config, info, model = restore_step(checkpoint)
    rt = Runtime.of(config)
    model = rt.place(model).eval()  # the run's memory format
    normalise = test_transform(None)  # full image: only scaling and ImageNet normalisation
    # the last entry: a model's "no prediction" channel (SimCIS's void), drawn as void (255)
    to_class = torch.tensor([*info.order, IGNORE_INDEX], dtype=torch.uint8)
    palette = color_map()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"--out {out}: cannot create the folder ({err.strerror or err})") from None
    written = []
    for path, image, (mask_path, overlay_path) in zip(images, decoded, plans, strict=True):
        x = normalise(image).unsqueeze(0).to(rt.device, memory_format=rt.memory_format)
        with rt.autocast():
            channels = predict_channels(model.prediction_scores(model(x)))[0].cpu()
        mask = to_class[channels].numpy()
        png = Image.fromarray(mask, mode="P")
        png.putpalette(palette.flatten().tolist())
        _write_png(png, mask_path)
        rgb = image.permute(1, 2, 0).numpy()
        blend = (0.5 * rgb + 0.5 * palette[mask]).astype(np.uint8)
        _write_png(Image.fromarray(np.concatenate([rgb, blend], axis=1)), overlay_path)
        names = [*info.class_names, "no prediction"]
        found = ", ".join(names[k] for k in np.unique(channels.numpy()))
        log.info(f"{path} -> {mask_path}, {overlay_path} ({found})")
        written += [mask_path, overlay_path]
    log.info(f"wrote {len(images)} mask(s) and {len(images)} overlay(s), all PNG, into {out}")
    return written
