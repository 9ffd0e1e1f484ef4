"""``incseg predict``: segment images with a saved step and write palette masks and overlays.

Masks hold *dataset* class ids (the model's channel k is class ``order[k]`` of its step), written
as palette PNGs with the standard VOC colour map, so they open like the dataset's own labels.
Overlays put the image and the image blended with the coloured mask side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from incseg.data.files import read_image
from incseg.data.transforms import test_transform
from incseg.engine.evaluate import predict_channels
from incseg.engine.model_io import restore_step
from incseg.engine.runtime import Runtime
from incseg.errors import DataError

log = logging.getLogger(__name__)


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


@torch.no_grad()
def predict_images(checkpoint: dict, images: Sequence[Path], out: Path) -> list[Path]:
    """Write ``<stem>.png`` (mask) and ``<stem>_overlay.jpg`` into ``out`` for every image.

    Every image is read first, so an unreadable one stops the command before anything is written.
    """
    decoded = []
    for path in images:
        if not Path(path).is_file():
            raise DataError(f"{path}: no such image")
        decoded.append(read_image(Path(path)))
    config, info, model = restore_step(checkpoint)
    rt = Runtime.of(config)
    model = rt.place(model).eval()  # the run's memory format
    normalise = test_transform(None)  # full image: only scaling and ImageNet normalisation
    to_class = torch.tensor(info.order, dtype=torch.uint8)
    palette = color_map()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, image in zip(images, decoded, strict=True):
        x = normalise(image).unsqueeze(0).to(rt.device, memory_format=rt.memory_format)
        with rt.autocast():
            channels = predict_channels(model(x).logits)[0].cpu()
        mask = to_class[channels].numpy()
        stem = Path(path).stem
        png = Image.fromarray(mask, mode="P")
        png.putpalette(palette.flatten().tolist())
        png.save(out / f"{stem}.png")
        rgb = image.permute(1, 2, 0).numpy()
        blend = (0.5 * rgb + 0.5 * palette[mask]).astype(np.uint8)
        Image.fromarray(np.concatenate([rgb, blend], axis=1)).save(
            out / f"{stem}_overlay.jpg", quality=90
        )
        found = ", ".join(info.class_names[k] for k in np.unique(channels.numpy()))
        log.info(f"{path} -> {out / (stem + '.png')} ({found})")
        written.append(out / f"{stem}.png")
    return written
