"""``incseg predict`` as a user runs it: it never writes over a file (an input, another output,
anything already in --out), names unreadable images clearly (too large, not an image,
truncated), reads 16-bit grey and other pixel formats as 8-bit RGB, and writes lossless PNG
overlays."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from incseg.cli import main
from incseg.errors import DataError
from incseg.predict import _write_png, load_image


@pytest.fixture(scope="module")
def run_dir(tiny_config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    assert main(["run", str(tiny_config_path), "--out", str(out), "--no-progress"]) == 0
    return out


def _photo(path, seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    array = (rng.random((*size, 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _predict(run_dir, *args):
    return main(["predict", str(run_dir), *map(str, args)])


def test_output_next_to_the_input_never_overwrites_it(run_dir, tmp_path, capsys):
    photo = tmp_path / "photos" / "photo.png"
    _photo(photo)
    before = _digest(photo)
    assert _predict(run_dir, photo, "--out", photo.parent) == 2
    err = capsys.readouterr().err
    assert f"{photo}: its mask {photo} would overwrite the image itself" in err
    assert _digest(photo) == before
    assert sorted(p.name for p in photo.parent.iterdir()) == ["photo.png"]  # nothing written


@pytest.mark.parametrize("names", [("a.png", "a.jpg"), ("x/a.png", "y/a.png"), ("A.png", "a.jpg")])
def test_two_images_with_one_output_name_are_refused_before_writing(
    run_dir, tmp_path, capsys, names
):
    images = [tmp_path / "in" / name for name in names]
    for seed, image in enumerate(images):
        _photo(image, seed)
    out = tmp_path / "pred"
    assert _predict(run_dir, *images, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"the mask of {images[0]} and the mask of {images[1]} would both be" in err
    assert "NAME.png, NAME_overlay.png" in err
    assert not out.exists()


def test_an_overlay_name_clashing_with_another_mask_is_refused(run_dir, tmp_path, capsys):
    images = [tmp_path / "in" / "x.png", tmp_path / "in" / "x_overlay.jpg"]
    for image in images:
        _photo(image)
    assert _predict(run_dir, *images, "--out", tmp_path / "pred") == 2
    assert f"the overlay of {images[0]} and the mask of {images[1]}" in capsys.readouterr().err


def test_existing_outputs_are_listed_and_kept(run_dir, tmp_path, capsys):
    images = [tmp_path / "in" / f"{name}.png" for name in ("a", "b", "c")]
    for image in images:
        _photo(image)
    out = tmp_path / "pred"
    out.mkdir()
    (out / "b.png").write_text("my own file")
    (out / "c_overlay.png").write_text("another")
    assert _predict(run_dir, *images, "--out", out) == 2
    err = capsys.readouterr().err
    assert "2 output file(s) already exist and are never overwritten: b.png, c_overlay.png" in err
    assert (out / "b.png").read_text() == "my own file"
    assert sorted(p.name for p in out.iterdir()) == ["b.png", "c_overlay.png"]  # a.png not written


def test_out_naming_a_file_is_an_error(run_dir, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    _photo(photo)
    target = tmp_path / "results.txt"
    target.write_text("keep")
    assert _predict(run_dir, photo, "--out", target) == 2
    assert f"--out {target}: is a file, expected a folder" in capsys.readouterr().err
    assert target.read_text() == "keep"


def test_the_same_image_twice_is_named(run_dir, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    _photo(photo)
    assert _predict(run_dir, photo, photo, "--out", tmp_path / "pred") == 2
    assert f"{photo}: given twice" in capsys.readouterr().err


def test_exclusive_write_never_replaces_a_file(tmp_path):
    target = tmp_path / "m.png"
    target.write_text("appeared meanwhile")
    with pytest.raises(DataError, match="appeared while predicting; it is not overwritten"):
        _write_png(Image.new("RGB", (2, 2)), target)
    assert target.read_text() == "appeared meanwhile"


def test_a_225_megapixel_image_gets_a_message_not_a_traceback(run_dir, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.new("1", (15000, 15000)).save(big)  # 27 kB on disk, 225 megapixels
    out = tmp_path / "pred"
    assert _predict(run_dir, big, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {big}: 225000000 pixels (225 megapixels), over the limit of ")
    assert f"{2 * Image.MAX_IMAGE_PIXELS} pixels" in err and "downscale" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (lambda png: b"hello, not an image", "not an image file PIL can read"),
        (lambda png: png[: len(png) // 2], "truncated or corrupt image file"),
    ],
    ids=["not-an-image", "truncated"],
)
def test_unreadable_images_are_named(run_dir, tmp_path, capsys, content, expected):
    good = tmp_path / "good.png"
    _photo(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(content(good.read_bytes()))
    out = tmp_path / "pred"
    assert _predict(run_dir, good, bad, "--out", out) == 2
    assert f"error: {bad}: {expected}" in capsys.readouterr().err
    assert not out.exists()  # the good image's results are not written either


def test_a_folder_or_missing_image_is_named(run_dir, tmp_path, capsys):
    assert _predict(run_dir, tmp_path, "--out", tmp_path / "pred") == 2
    assert f"{tmp_path}: is a folder, expected an image file" in capsys.readouterr().err
    assert _predict(run_dir, tmp_path / "nope.png", "--out", tmp_path / "pred") == 2
    assert f"{tmp_path / 'nope.png'}: no such image" in capsys.readouterr().err


def _grey16(path):
    values = np.linspace(0, 65535, 40 * 48).round().astype(np.uint16).reshape(40, 48)
    Image.fromarray(values).save(path)  # a real 16-bit grey PNG
    return values


def test_16_bit_grey_png_keeps_its_top_8_bits(tmp_path):
    path = tmp_path / "grey16.png"
    values = _grey16(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # what PIL makes of a 16-bit grey PNG
    image = load_image(path)
    assert image.shape == (3, 40, 48) and image.dtype == torch.uint8
    expected = (values >> 8).astype(np.uint8)
    for channel in image.numpy():
        assert np.array_equal(channel, expected)
    assert image.max() == 255 and image.min() == 0  # the full range, not all white


def test_16_bit_grey_png_is_predicted_from_its_real_pixels(run_dir, tmp_path, capsys):
    path = tmp_path / "grey16.png"
    values = _grey16(path)
    out = tmp_path / "pred"
    assert _predict(run_dir, path, "--out", out) == 0
    with Image.open(out / "grey16_overlay.png") as overlay:
        left = np.array(overlay)[:, :48]
    assert np.array_equal(left, np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=2))


def test_32_bit_pixels_beyond_16_bits_are_refused(tmp_path):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(path)
    with pytest.raises(DataError, match=r"wide.tif: 32-bit integer pixels from 0 to 70000"):
        load_image(path)
    narrow = tmp_path / "narrow.tif"
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(narrow)
    assert load_image(narrow)[0].tolist() == [[0, 255]]


def test_floating_point_images_are_refused(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.zeros((2, 2), dtype=np.float32)).save(path)
    with pytest.raises(DataError, match=r"float.tif: floating-point pixels \(PIL mode F\)"):
        load_image(path)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1", "CMYK"])
def test_other_modes_become_rgb(tmp_path, mode):
    rgb = Image.fromarray(_photo(tmp_path / "src.png"))
    img = rgb.convert(mode)
    path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    img.save(path)
    with Image.open(path) as saved:
        assert saved.mode == mode
        expected = np.array(saved.convert("RGB"))
    image = load_image(path)
    assert image.shape == (3, 40, 48)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)


def test_overlays_are_lossless_pngs_and_reported(run_dir, tmp_path, capsys):
    photo = tmp_path / "in" / "photo.jpg"
    _photo(photo)
    with Image.open(photo) as img:
        pixels = np.array(img.convert("RGB"))
    out = tmp_path / "pred"
    assert _predict(run_dir, photo, "--out", out) == 0
    stdout = capsys.readouterr().out
    assert f"{photo} -> {out / 'photo.png'}, {out / 'photo_overlay.png'} (" in stdout
    assert f"wrote 1 mask(s) and 1 overlay(s), all PNG, into {out}" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["photo.png", "photo_overlay.png"]
    with Image.open(out / "photo_overlay.png") as overlay, Image.open(out / "photo.png") as mask:
        assert overlay.format == "PNG" and overlay.size == (96, 40)
        assert np.array_equal(np.array(overlay)[:, :48], pixels)  # the image, bit for bit
        assert mask.format == "PNG" and mask.mode == "P"
