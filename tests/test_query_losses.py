"""incseg.query_losses against a restatement of Mask2Former's own code, and hand-made cases.

The ``ref_*`` functions and ``Ref*`` classes below restate, loop for loop, the official code at
facebookresearch/Mask2Former 9b0651c (``mask2former/modeling/matcher.py``,
``mask2former/modeling/criterion.py``, ``mask2former/maskformer_model.py``,
``mask2former/utils/misc.py``) and detectron2 02b5c4e
(``projects/PointRend/point_rend/point_features.py``), on one process, drawing from the global
generator as they do. The TorchScript wrappers (``*_jit``) are left out: scripting does not
change the arithmetic. Nothing here imports pieces of the module under test.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.detectron2_ref import ref_get_uncertain_point_coords_with_randomness, ref_point_sample
from scipy.optimize import linear_sum_assignment

from incseg import query_losses as ql

# ---- restatement of the official code -------------------------------------------------------


def ref_calculate_uncertainty(logits):  # criterion.py:73-87
    assert logits.shape[1] == 1
    gt_class_logits = logits.clone()
    return -(torch.abs(gt_class_logits))


def ref_dice_loss(inputs, targets, num_masks):  # criterion.py:21-40
    inputs = inputs.sigmoid()
    inputs = inputs.flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def ref_sigmoid_ce_loss(inputs, targets, num_masks):  # criterion.py:48-65
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def ref_batch_dice_loss(inputs, targets):  # matcher.py:15-30
    inputs = inputs.sigmoid()
    inputs = inputs.flatten(1)
    numerator = 2 * torch.einsum("nc,mc->nm", inputs, targets)
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss


def ref_batch_sigmoid_ce_loss(inputs, targets):  # matcher.py:38-62
    hw = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    loss = torch.einsum("nc,mc->nm", pos, targets) + torch.einsum("nc,mc->nm", neg, (1 - targets))
    return loss / hw


class RefHungarianMatcher:  # matcher.py:70-179
    def __init__(self, cost_class=1, cost_mask=1, cost_dice=1, num_points=0):
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        assert cost_class != 0 or cost_mask != 0 or cost_dice != 0, "all costs cant be 0"
        self.num_points = num_points

    @torch.no_grad()
    def memory_efficient_forward(self, outputs, targets):
        bs, num_queries = outputs["pred_logits"].shape[:2]
        indices = []
        for b in range(bs):
            out_prob = outputs["pred_logits"][b].softmax(-1)
            tgt_ids = targets[b]["labels"]
            cost_class = -out_prob[:, tgt_ids]
            out_mask = outputs["pred_masks"][b]
            tgt_mask = targets[b]["masks"].to(out_mask)
            out_mask = out_mask[:, None]
            tgt_mask = tgt_mask[:, None]
            point_coords = torch.rand(1, self.num_points, 2, device=out_mask.device)
            tgt_mask = ref_point_sample(
                tgt_mask, point_coords.repeat(tgt_mask.shape[0], 1, 1), align_corners=False
            ).squeeze(1)
            out_mask = ref_point_sample(
                out_mask, point_coords.repeat(out_mask.shape[0], 1, 1), align_corners=False
            ).squeeze(1)
            # official: torch.cuda.amp.autocast(enabled=False); no autocast is active here
            out_mask = out_mask.float()
            tgt_mask = tgt_mask.float()
            cost_mask = ref_batch_sigmoid_ce_loss(out_mask, tgt_mask)
            cost_dice = ref_batch_dice_loss(out_mask, tgt_mask)
            C = (
                self.cost_mask * cost_mask
                + self.cost_class * cost_class
                + self.cost_dice * cost_dice
            )
            C = C.reshape(num_queries, -1).cpu()
            indices.append(linear_sum_assignment(C))
        return [
            (torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
            for i, j in indices
        ]

    def __call__(self, outputs, targets):
        return self.memory_efficient_forward(outputs, targets)


def ref_nested_tensor_from_tensor_list(tensor_list):  # utils/misc.py:16-22, 48-70
    maxes = list(tensor_list[0].shape)
    for img in tensor_list[1:]:
        for index, item in enumerate(img.shape):
            maxes[index] = max(maxes[index], item)
    b, c, h, w = [len(tensor_list)] + maxes
    tensor = torch.zeros((b, c, h, w), dtype=tensor_list[0].dtype)
    mask = torch.ones((b, h, w), dtype=torch.bool)
    for img, pad_img, m in zip(tensor_list, tensor, mask):
        pad_img[: img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return tensor, mask


class RefSetCriterion:  # criterion.py:90-247, on one process
    def __init__(
        self, num_classes, matcher, weight_dict, eos_coef, losses, num_points, oversample_ratio,
        importance_sample_ratio, world_size=1,
    ):  # fmt: skip
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = losses
        empty_weight = torch.ones(self.num_classes + 1)
        empty_weight[-1] = self.eos_coef
        self.empty_weight = empty_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.world_size = world_size  # stands in for all_reduce of equal counts + get_world_size

    def loss_labels(self, outputs, targets, indices, num_masks):
        src_logits = outputs["pred_logits"].float()
        idx = self._get_src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64)
        target_classes[idx] = target_classes_o
        loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss_ce}

    def loss_masks(self, outputs, targets, indices, num_masks):
        src_idx = self._get_src_permutation_idx(indices)
        tgt_idx = self._get_tgt_permutation_idx(indices)
        src_masks = outputs["pred_masks"]
        src_masks = src_masks[src_idx]
        masks = [t["masks"] for t in targets]
        target_masks, _valid = ref_nested_tensor_from_tensor_list(masks)
        target_masks = target_masks.to(src_masks)
        target_masks = target_masks[tgt_idx]
        src_masks = src_masks[:, None]
        target_masks = target_masks[:, None]
        with torch.no_grad():
            point_coords = ref_get_uncertain_point_coords_with_randomness(
                src_masks,
                lambda logits: ref_calculate_uncertainty(logits),
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            point_labels = ref_point_sample(
                target_masks, point_coords, align_corners=False
            ).squeeze(1)
        point_logits = ref_point_sample(src_masks, point_coords, align_corners=False).squeeze(1)
        return {
            "loss_mask": ref_sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": ref_dice_loss(point_logits, point_labels, num_masks),
        }

    def _get_src_permutation_idx(self, indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for (src, _) in indices])
        return batch_idx, src_idx

    def _get_tgt_permutation_idx(self, indices):
        batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
        tgt_idx = torch.cat([tgt for (_, tgt) in indices])
        return batch_idx, tgt_idx

    def get_loss(self, loss, outputs, targets, indices, num_masks):
        loss_map = {"labels": self.loss_labels, "masks": self.loss_masks}
        return loss_map[loss](outputs, targets, indices, num_masks)

    def __call__(self, outputs, targets):
        outputs_without_aux = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(outputs_without_aux, targets)
        num_masks = sum(len(t["labels"]) for t in targets)
        num_masks = torch.as_tensor([num_masks], dtype=torch.float)
        num_masks = num_masks * self.world_size  # all_reduce(sum) when every process has the same
        num_masks = torch.clamp(num_masks / self.world_size, min=1).item()
        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_masks))
        if "aux_outputs" in outputs:
            for i, aux_outputs in enumerate(outputs["aux_outputs"]):
                indices = self.matcher(aux_outputs, targets)
                for loss in self.losses:
                    l_dict = self.get_loss(loss, aux_outputs, targets, indices, num_masks)
                    l_dict = {k + f"_{i}": v for k, v in l_dict.items()}
                    losses.update(l_dict)
        return losses


def ref_build(cfg):  # maskformer_model.py:101-138 with the ADE20K yaml values
    matcher = RefHungarianMatcher(
        cost_class=cfg["CLASS_WEIGHT"],
        cost_mask=cfg["MASK_WEIGHT"],
        cost_dice=cfg["DICE_WEIGHT"],
        num_points=cfg["TRAIN_NUM_POINTS"],
    )
    weight_dict = {
        "loss_ce": cfg["CLASS_WEIGHT"],
        "loss_mask": cfg["MASK_WEIGHT"],
        "loss_dice": cfg["DICE_WEIGHT"],
    }
    if cfg["DEEP_SUPERVISION"]:
        aux_weight_dict = {}
        for i in range(cfg["DEC_LAYERS"] - 1):
            aux_weight_dict.update({k + f"_{i}": v for k, v in weight_dict.items()})
        weight_dict.update(aux_weight_dict)
    return RefSetCriterion(
        cfg["NUM_CLASSES"],
        matcher=matcher,
        weight_dict=weight_dict,
        eos_coef=cfg["NO_OBJECT_WEIGHT"],
        losses=["labels", "masks"],
        num_points=cfg["TRAIN_NUM_POINTS"],
        oversample_ratio=cfg["OVERSAMPLE_RATIO"],
        importance_sample_ratio=cfg["IMPORTANCE_SAMPLE_RATIO"],
        world_size=cfg.get("WORLD_SIZE", 1),
    )


def ref_weighted_total(losses, weight_dict):  # maskformer_model.py:211-217 + trainer's sum
    losses = dict(losses)
    for k in list(losses.keys()):
        if k in weight_dict:
            losses[k] *= weight_dict[k]
        else:
            losses.pop(k)
    return sum(losses.values())


def ref_semantic_inference(mask_cls, mask_pred):  # maskformer_model.py:280-284, one image
    mask_cls = F.softmax(mask_cls, dim=-1)[..., :-1]
    mask_pred = mask_pred.sigmoid()
    return torch.einsum("qc,qhw->chw", mask_cls, mask_pred)


ADE = {  # maskformer2_R50_bs16_160k.yaml:21-38 (NUM_CLASSES is small here)
    "NUM_CLASSES": 6,
    "DEEP_SUPERVISION": True,
    "NO_OBJECT_WEIGHT": 0.1,
    "CLASS_WEIGHT": 2.0,
    "MASK_WEIGHT": 5.0,
    "DICE_WEIGHT": 5.0,
    "DEC_LAYERS": 3,
    "TRAIN_NUM_POINTS": 12544,
    "OVERSAMPLE_RATIO": 3.0,
    "IMPORTANCE_SAMPLE_RATIO": 0.75,
}

# ---- helpers ----------------------------------------------------------------------------------


def random_targets(gen, counts, num_classes, size, bool_masks=True):
    targets = []
    for n, (h, w) in zip(counts, size if isinstance(size, list) else [size] * len(counts)):
        labels = torch.randperm(num_classes, generator=gen)[:n]
        masks = torch.rand(n, h, w, generator=gen) > 0.5
        targets.append({"labels": labels, "masks": masks if bool_masks else masks.float()})
    return targets


def random_outputs(gen, batch, queries, num_classes, size, num_aux):
    def one():
        return {
            "pred_logits": torch.randn(batch, queries, num_classes + 1, generator=gen),
            "pred_masks": 3 * torch.randn(batch, queries, *size, generator=gen),
        }

    outputs = one()
    outputs["aux_outputs"] = [one() for _ in range(num_aux)]
    return outputs


def leaves(outputs):
    """The output tensors, as fresh leaves with gradients, in a fixed order."""
    stages = [outputs] + outputs.get("aux_outputs", [])
    return [t for s in stages for t in (s["pred_logits"], s["pred_masks"])]


def clone_outputs(outputs):
    def one(s):
        return {
            k: s[k].detach().clone().requires_grad_(True) for k in ("pred_logits", "pred_masks")
        }

    cloned = one(outputs)
    cloned["aux_outputs"] = [one(a) for a in outputs.get("aux_outputs", [])]
    return cloned


def criterion_weights(cfg):
    return ql.CriterionWeights(
        class_weight=cfg["CLASS_WEIGHT"],
        mask_weight=cfg["MASK_WEIGHT"],
        dice_weight=cfg["DICE_WEIGHT"],
        no_object_weight=cfg["NO_OBJECT_WEIGHT"],
        num_points=cfg["TRAIN_NUM_POINTS"],
        oversample_ratio=cfg["OVERSAMPLE_RATIO"],
        importance_sample_ratio=cfg["IMPORTANCE_SAMPLE_RATIO"],
        deep_supervision=cfg["DEEP_SUPERVISION"],
    )


def assert_same_losses_and_grads(cfg, outputs, targets, seed, use_generator, **kwargs):
    """Official and incseg losses, weighted totals and gradients from one seed."""
    ref_out, our_out = clone_outputs(outputs), clone_outputs(outputs)
    criterion = ref_build(cfg)
    torch.manual_seed(seed)
    ref_losses = criterion(ref_out, targets)
    ref_next = torch.rand(3)  # the official leaves the global generator here
    generator = torch.Generator().manual_seed(seed) if use_generator else None
    if not use_generator:
        torch.manual_seed(seed)
    weights = criterion_weights(cfg)
    losses = ql.set_criterion(
        our_out, targets, cfg["NUM_CLASSES"], weights, generator=generator, **kwargs
    )
    if not use_generator:
        assert torch.equal(torch.rand(3), ref_next)  # same number of draws
    assert list(losses) == list(ref_losses)
    for key in ref_losses:
        torch.testing.assert_close(losses[key], ref_losses[key], rtol=0, atol=1e-6, msg=key)
    ref_total = ref_weighted_total(ref_losses, criterion.weight_dict)
    total = ql.weighted_total(losses, weights)
    torch.testing.assert_close(total, ref_total, rtol=0, atol=1e-5)
    ref_total.backward()
    total.backward()
    for ours, ref in zip(leaves(our_out), leaves(ref_out)):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=0, atol=1e-6)
    return losses


# ---- equality with the official code --------------------------------------------------------


def test_point_sample_matches_official():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 2, 5, 7, generator=gen)
    coords = torch.rand(3, 11, 2, generator=gen)
    grid = torch.rand(3, 4, 6, 2, generator=gen)
    out = ql.point_sample(feats, coords)
    assert out.shape == (3, 2, 11)
    assert torch.equal(out, ref_point_sample(feats, coords, align_corners=False))
    assert torch.equal(
        ql.point_sample(feats, grid), ref_point_sample(feats, grid, align_corners=False)
    )
    assert torch.equal(
        ql.point_sample(feats, coords, align_corners=True),
        ref_point_sample(feats, coords, align_corners=True),
    )


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("ratios", [(3.0, 0.75), (1.0, 1.0), (2.5, 0.0)])
def test_uncertain_point_coords_global_generator_matches_official(seed, ratios):
    oversample, importance = ratios
    logits = 4 * torch.randn(4, 1, 9, 8, generator=torch.Generator().manual_seed(seed + 1))
    torch.manual_seed(seed)
    ref = ref_get_uncertain_point_coords_with_randomness(
        logits, ref_calculate_uncertainty, 50, oversample, importance
    )
    ref_next = torch.rand(2)
    torch.manual_seed(seed)
    ours = ql.uncertain_point_coords(logits, 50, oversample, importance)
    assert ours.shape == (4, 50, 2)
    assert torch.equal(ours, ref)
    assert torch.equal(torch.rand(2), ref_next)  # the same draws, in the same order
    gen = torch.Generator().manual_seed(seed)
    assert torch.equal(ql.uncertain_point_coords(logits, 50, oversample, importance, gen), ref)


def test_uncertain_point_coords_rejects_bad_ratios():
    logits = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError):
        ql.uncertain_point_coords(logits, 4, 0.5, 0.5)
    with pytest.raises(ValueError):
        ql.uncertain_point_coords(logits, 4, 2.0, 1.5)


def test_losses_and_pairwise_costs_match_official():
    gen = torch.Generator().manual_seed(3)
    inputs = 3 * torch.randn(5, 40, generator=gen)
    targets = (torch.rand(5, 40, generator=gen) > 0.4).float()
    other = torch.rand(7, 40, generator=gen)
    for ours, ref in [
        (ql.dice_loss(inputs, targets, 2.5), ref_dice_loss(inputs, targets, 2.5)),
        (ql.sigmoid_ce_loss(inputs, targets, 2.5), ref_sigmoid_ce_loss(inputs, targets, 2.5)),
        (ql.batch_dice_cost(inputs, other), ref_batch_dice_loss(inputs, other)),
        (ql.batch_sigmoid_ce_cost(inputs, other), ref_batch_sigmoid_ce_loss(inputs, other)),
    ]:
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert ql.batch_dice_cost(inputs, other).shape == (5, 7)


@pytest.mark.parametrize("use_generator", [False, True])
def test_hungarian_match_matches_official(use_generator):
    gen = torch.Generator().manual_seed(11)
    outputs = random_outputs(gen, batch=4, queries=8, num_classes=10, size=(12, 10), num_aux=0)
    # Image 3 has more targets than queries: only 8 of its 9 are matched.
    targets = random_targets(gen, [3, 0, 6, 9], 10, (12, 10), bool_masks=use_generator)
    weights = ql.MatcherWeights(num_points=300)
    torch.manual_seed(5)
    ref = RefHungarianMatcher(2.0, 5.0, 5.0, 300)(outputs, targets)
    generator = torch.Generator().manual_seed(5) if use_generator else None
    torch.manual_seed(5)
    ours = ql.hungarian_match(
        outputs["pred_logits"], outputs["pred_masks"], targets, weights, generator
    )
    assert len(ours) == 4
    for (rows, cols), (ref_rows, ref_cols), target in zip(ours, ref, targets):
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == min(8, len(target["labels"]))
        assert torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols)


@pytest.mark.parametrize("use_generator", [False, True])
def test_set_criterion_matches_official_ade_defaults(use_generator):
    gen = torch.Generator().manual_seed(21)
    outputs = random_outputs(gen, batch=3, queries=7, num_classes=6, size=(16, 16), num_aux=2)
    targets = random_targets(gen, [2, 0, 5], 6, (16, 16))
    losses = assert_same_losses_and_grads(ADE, outputs, targets, 4, use_generator)
    expected = ["loss_ce", "loss_mask", "loss_dice"]
    assert list(losses) == expected + [k + s for s in ("_0", "_1") for k in expected]
    assert ql.CriterionWeights() == criterion_weights(ADE)  # the defaults are the yaml's


def test_set_criterion_matches_official_small_cases():
    gen = torch.Generator().manual_seed(8)
    cfg = dict(ADE, TRAIN_NUM_POINTS=97, OVERSAMPLE_RATIO=2.0, IMPORTANCE_SAMPLE_RATIO=0.5)
    # Target masks of different sizes are zero-padded as nested_tensor_from_tensor_list does.
    outputs = random_outputs(gen, batch=2, queries=5, num_classes=6, size=(8, 9), num_aux=1)
    targets = random_targets(gen, [3, 4], 6, [(8, 9), (6, 5)], bool_masks=False)
    assert_same_losses_and_grads(cfg, outputs, targets, 1, False)
    # No target anywhere: the normalizer is clamped to 1 and every query is no-object.
    targets = random_targets(gen, [0, 0], 6, (8, 9))
    losses = assert_same_losses_and_grads(cfg, outputs, targets, 2, False)
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0
    # Without deep supervision the aux losses are still returned but carry no weight.
    cfg = dict(cfg, DEEP_SUPERVISION=False)
    targets = random_targets(gen, [1, 5], 6, (8, 9))
    assert_same_losses_and_grads(cfg, outputs, targets, 3, False)


def test_set_criterion_num_masks_over_processes():
    gen = torch.Generator().manual_seed(9)
    cfg = dict(ADE, TRAIN_NUM_POINTS=64, WORLD_SIZE=4)
    outputs = random_outputs(gen, batch=2, queries=5, num_classes=6, size=(8, 8), num_aux=0)
    targets = random_targets(gen, [3, 4], 6, (8, 8))
    # Four processes holding the same count: the mean of 7 is 7.
    assert_same_losses_and_grads(
        cfg, outputs, targets, 0, False, mean_over_processes=lambda x: (4 * x) / 4
    )
    # An explicit count and a halving mean: normalizer max(10 / 2, 1) = 5 instead of 7.
    torch.manual_seed(0)
    base = ql.set_criterion(outputs, targets, 6, criterion_weights(cfg))
    torch.manual_seed(0)
    other = ql.set_criterion(
        outputs,
        targets,
        6,
        criterion_weights(cfg),
        num_masks=10,
        mean_over_processes=lambda x: x / 2,
    )
    torch.testing.assert_close(other["loss_ce"], base["loss_ce"])
    torch.testing.assert_close(other["loss_mask"], base["loss_mask"] * 7 / 5)
    torch.testing.assert_close(other["loss_dice"], base["loss_dice"] * 7 / 5)


def test_a_custom_class_loss_replaces_the_cross_entropy_at_every_prediction():
    gen = torch.Generator().manual_seed(2)
    outputs = random_outputs(gen, batch=1, queries=3, num_classes=4, size=(6, 6), num_aux=2)
    targets = random_targets(gen, [2], 4, (6, 6))
    calls = []

    def constant(pred_logits, targets, indices, num_classes, eos):
        calls.append((pred_logits.shape, len(indices[0][0]), num_classes, eos))
        return torch.tensor(7.0)

    weights = ql.CriterionWeights(num_points=16)
    losses = ql.set_criterion(outputs, targets, 4, weights, class_loss=constant)
    assert calls == [((1, 3, 5), 2, 4, 0.1)] * 3
    assert [losses[k].item() for k in ("loss_ce", "loss_ce_0", "loss_ce_1")] == [7.0] * 3
    plain = ql.set_criterion(outputs, targets, 4, weights)
    assert plain["loss_ce"].item() != 7.0


def test_semantic_inference_matches_official():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 6, 5, generator=gen)
    masks = torch.randn(3, 6, 7, 8, generator=gen)
    out = ql.semantic_inference(logits, masks)
    assert out.shape == (3, 4, 7, 8)
    for b in range(3):
        torch.testing.assert_close(out[b], ref_semantic_inference(logits[b], masks[b]))


# ---- hand-computed cases -------------------------------------------------------------------


def test_dice_of_a_perfect_mask_is_zero():
    target = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]])
    logits = 100 * (2 * target - 1)  # sigmoid = 1 on the mask, ~0 off it
    assert ql.dice_loss(logits, target, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert ql.batch_dice_cost(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_sigmoid_ce_two_pixels_by_hand():
    # pixel 1: sigmoid(0) = 1/2, target 1 -> ln 2; pixel 2: sigmoid(ln 3) = 3/4, target 0 -> ln 4.
    inputs = torch.tensor([[0.0, math.log(3.0)]])
    targets = torch.tensor([[1.0, 0.0]])
    expected = (math.log(2.0) + math.log(4.0)) / 2
    assert ql.sigmoid_ce_loss(inputs, targets, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert ql.sigmoid_ce_loss(inputs, targets, 2.0).item() == pytest.approx(expected / 2, rel=1e-6)
    cost = ql.batch_sigmoid_ce_cost(inputs, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    swapped = (math.log(2.0) + (math.log(4.0) - math.log(3.0))) / 2  # -ln(1/2), -ln(3/4)
    torch.testing.assert_close(cost, torch.tensor([[expected, swapped]]))


def test_matcher_two_by_two_by_hand():
    # Class-only cost: q0 gives p = (1/6, 4/6), q1 gives (4/6, 1/6) to targets with labels (0, 1).
    # C = [[-1/6, -4/6], [-4/6, -1/6]]: the crossed assignment (-8/6) beats the identity (-2/6).
    logits = torch.log(torch.tensor([[[1.0, 4.0, 1.0], [4.0, 1.0, 1.0]]]))
    masks = torch.zeros(1, 2, 4, 4)
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.zeros(2, 4, 4)}]
    class_only = ql.MatcherWeights(cost_class=1.0, cost_mask=0.0, cost_dice=0.0, num_points=8)
    ((rows, cols),) = ql.hungarian_match(logits, masks, targets, class_only)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    # Mask cost decides when the classes tie: q0 covers the right half, q1 the left half.
    left = torch.zeros(4, 4)
    left[:, :2] = 1
    masks = torch.stack([10 * (1 - 2 * left), 10 * (2 * left - 1)])[None]
    targets = [{"labels": torch.tensor([0, 0]), "masks": torch.stack([left, 1 - left])}]
    ((rows, cols),) = ql.hungarian_match(
        torch.zeros(1, 2, 3), masks, targets, ql.MatcherWeights(num_points=64)
    )
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]


def test_semantic_inference_one_query_by_hand():
    # softmax(ln 2, 0, 0) = (1/2, 1/4, 1/4) -> classes (1/2, 1/4); sigmoid(0, ln 3) = (1/2, 3/4).
    logits = torch.tensor([[[math.log(2.0), 0.0, 0.0]]])
    masks = torch.tensor([[[[0.0, math.log(3.0)]]]])
    expected = torch.tensor([[[[1 / 4, 3 / 8]], [[1 / 8, 3 / 16]]]])
    torch.testing.assert_close(ql.semantic_inference(logits, masks), expected)


def test_masks_from_labels_drops_ignore():
    label = torch.tensor([[0, 3, 255], [3, 3, 7]])
    target = ql.masks_from_labels(label)
    assert target["labels"].dtype == torch.int64
    assert target["labels"].tolist() == [0, 3, 7]
    assert target["masks"].dtype == torch.bool
    assert target["masks"].int().tolist() == [
        [[1, 0, 0], [0, 0, 0]],
        [[0, 1, 0], [1, 1, 0]],
        [[0, 0, 0], [0, 0, 1]],
    ]
    empty = ql.masks_from_labels(torch.full((2, 3), 255))
    assert empty["labels"].shape == (0,) and empty["masks"].shape == (0, 2, 3)
    assert ql.masks_from_labels(label, ignore=3)["labels"].tolist() == [0, 7, 255]


def test_weighted_total_uses_the_official_weight_dict():
    losses = {"loss_ce": torch.tensor(1.0), "loss_mask": torch.tensor(2.0)}
    losses.update({"loss_dice": torch.tensor(3.0), "loss_ce_0": torch.tensor(4.0)})
    losses.update({"loss_mask_0": torch.tensor(5.0), "loss_dice_0": torch.tensor(6.0)})
    assert ql.weighted_total(losses, ql.CriterionWeights()).item() == pytest.approx(
        2 * 1 + 5 * 2 + 5 * 3 + 2 * 4 + 5 * 5 + 5 * 6
    )
    no_aux = ql.CriterionWeights(deep_supervision=False)
    assert ql.weighted_total(losses, no_aux).item() == pytest.approx(2 * 1 + 5 * 2 + 5 * 3)
    assert list(ql.loss_weight_dict(ql.CriterionWeights(), 3)) == [
        "loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0",
        "loss_ce_1", "loss_mask_1", "loss_dice_1",
    ]  # fmt: skip
