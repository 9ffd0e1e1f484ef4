"""PLOP on Mask2Former as CoMFormer's code defines it (``m2f_plop``): its local POD against a
literal re-statement of ``continual/modeling/pod.py`` (fcdl94/CoMFormer 640496b), a hand case,
the method's total against the official pieces, and a tiny run through the command line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.method_runs import run_method
from test_query_model import COMFORMER_SETS, model

from incseg.comformer_losses import mask2former_pod


def official_local_pod(x, spp_scales=(1, 2, 4)):
    """``pod.py:23-38``, restated."""
    b = x.shape[0]
    w = x.shape[-1]
    emb = []
    for scale in spp_scales:
        k = w // scale
        for i in range(scale):
            for j in range(scale):
                tensor = x[..., i * k : (i + 1) * k, j * k : (j + 1) * k]
                horizontal_pool = tensor.mean(dim=3).view(b, -1)
                vertical_pool = tensor.mean(dim=2).view(b, -1)
                emb.append(horizontal_pool)
                emb.append(vertical_pool)
    return torch.cat(emb, dim=1)


def official_pod_loss(feats, old_feats, scales=(1, 2, 4)):
    """``pod.py:5-20`` with ``normalize=False``, restated (``frobenius_norm`` over one dim is
    the L2 norm)."""
    loss = torch.tensor(0.0)
    for feat, old_feat in zip(feats, old_feats):
        emb = official_local_pod(feat, scales)
        old_emb = official_local_pod(old_feat, scales)
        loss = loss + torch.linalg.vector_norm(emb - old_emb, dim=-1)
    return loss.mean() / len(feats)


def test_pod_matches_the_official_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4, 16, 16), (3, 8, 8, 8), (3, 2, 10, 10), (3, 5, 13, 9)]  # 10, 9: cut regions
    new = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    old = [torch.randn(s, generator=gen) for s in shapes]
    mine = mask2former_pod(old, new)
    (grads,) = [torch.autograd.grad(mine, new)]
    copies = [n.detach().clone().requires_grad_(True) for n in new]
    ref = official_pod_loss(copies, old)
    ref_grads = torch.autograd.grad(ref, copies)
    torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_pod_by_hand_on_one_square_map():
    # one image, one channel, 2 x 2, scale 1 only: rows' means (1.5, 3.5), columns' (2, 3)
    new = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    old = torch.zeros_like(new)
    expected = (1.5**2 + 3.5**2 + 2**2 + 3**2) ** 0.5
    assert mask2former_pod([old], [new], scales=(1,)).item() == pytest.approx(expected)
    # two layers: the mean over layers (the second adds 0)
    assert mask2former_pod([old, old], [new, old], scales=(1,)).item() == pytest.approx(
        expected / 2
    )
    with pytest.raises(ValueError, match="as many old maps"):
        mask2former_pod([old], [new, new])


def test_the_method_adds_pod_on_five_maps_weighted_by_the_class_ratio():
    from incseg.comformer_losses import comformer_criterion, weighted_total
    from incseg.methods.comformer import MaskPLOP, with_pseudo_labels
    from incseg.methods.query import targets_of
    from incseg.protocol import get_setting, step_info

    info = step_info(get_setting("voc", "15-5"), 1)
    net = model((16, 5), background=False, mask_activation="softmax")
    old_net = model((16,), background=False, mask_activation="softmax")
    # 128: res5 at stride 32 is 4 wide, the finest POD grid's
    images, labels = torch.randn(2, 3, 128, 128), torch.randint(0, 21, (2, 128, 128))
    with torch.no_grad():
        old = old_net(images, features=("maps",))
    assert len(old.maps) == 5 and old.maps[-1].shape[-2:] == (32, 32)  # res2-5, mask features
    method = MaskPLOP(num_points=64)
    torch.manual_seed(4)
    output = net(images, features=("maps",))
    terms = method.losses(output, old, labels, info)
    assert set(terms) == {"ce", "mask", "dice", "pod"}
    # maskformer.py:64-66: 0.001 * sqrt(5 new / 20 classes), no background class here
    pod = mask2former_pod(old.maps, output.maps)
    torch.testing.assert_close(terms["pod"], 0.001 * (5 / 20) ** 0.5 * pod)
    torch.manual_seed(4)
    found = targets_of(labels, 1)
    found = with_pseudo_labels(old, found, labels.shape[-2:], 0.0)
    raw = comformer_criterion(net(images).as_dict(), found, 0, None, method.comformer_weights())
    expected = weighted_total(raw, method.comformer_weights())
    torch.testing.assert_close(
        terms["ce"] + terms["mask"] + terms["dice"], expected, rtol=1e-5, atol=1e-6
    )


def test_a_tiny_m2f_plop_run_reports_pod_after_step_0(tiny_config_path, tmp_path):
    out = tmp_path / "run"
    sets = [s.replace("method.name=comformer", "method.name=m2f_plop") for s in COMFORMER_SETS]
    # res5 must be 4 wide for POD's finest grid: 128 px
    run_method(tiny_config_path, out, *sets, "data.image_size=128", "data.crop_size=128")
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert len(steps) == 2 and "pod" in steps[1]["losses"][0] and "pod" not in steps[0]["losses"][0]
    assert "kd" not in steps[1]["losses"][0]


def test_crops_too_small_for_pod_are_refused_before_training(tmp_path):
    from incseg.config import load_config
    from incseg.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {architecture: mask2former, mask2former: {background: false}}\n"
        "method: {name: m2f_plop}\n"
    )
    assert load_config(path, ["data.crop_size=128"]).method.name == "m2f_plop"
    with pytest.raises(
        ConfigError, match="data.crop_size: 64; method 'm2f_plop' needs at least 128"
    ):
        load_config(path, ["data.crop_size=64"])
