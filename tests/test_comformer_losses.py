"""incseg.comformer_losses against a restatement of CoMFormer's own code, and hand-made cases.

The ``ref_*`` functions and ``Ref*`` classes below restate, loop for loop, the official code at
fcdl94/CoMFormer 640496b (``mask2former/modeling/matcher.py``, ``mask_losses.py``,
``criterion.py``, ``mask2former/maskformer_model.py``, ``mask2former/utils/misc.py``,
``continual/method_wrapper/{loss,set_criterion,maskformer}.py``) and detectron2's PointRend
``point_features.py``, on one process, drawing from the global generator as they do. Only the
branches CoMFormer's and MiB's configurations take are restated (SOFTMASK, FOCAL, UKD with or
without KD_REW, UCE with FOCAL, no mask KD, KD_DEEP False). The TorchScript wrappers are left
out: scripting does not change the arithmetic. Nothing here imports pieces of the module under
test.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.detectron2_ref import ref_get_uncertain_point_coords_with_randomness, ref_point_sample
from scipy.optimize import linear_sum_assignment

from incseg import comformer_losses as cl

# ---- restatement of the official code -------------------------------------------------------


def ref_calculate_uncertainty(logits):  # criterion.py:32-46
    assert logits.shape[1] == 1
    gt_class_logits = logits.clone()
    return -(torch.abs(gt_class_logits))


def ref_batch_soft_dice_loss(inputs, targets):  # mask_losses.py:23-37
    inputs = inputs.flatten(1)
    numerator = 2 * torch.einsum("nc,mc->nm", inputs, targets)
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    loss = (numerator + 1) / (denominator + 1)
    return loss


def ref_softmax_dice_loss(inputs, targets, num_masks):  # mask_losses.py:112-130
    inputs = inputs.flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def ref_softmax_ce_loss(inputs, targets, num_masks):  # mask_losses.py:153-161
    loss = -inputs * targets
    return loss.mean(1).sum() / num_masks


def ref_focal_loss(  # continual/method_wrapper/loss.py:5-13
    inputs, targets, alpha=10, gamma=2, reduction="mean", ignore_index=255
):
    ce_loss = F.cross_entropy(inputs, targets, reduction="none", ignore_index=ignore_index)
    pt = torch.exp(-ce_loss)
    f_loss = alpha * (1 - pt) ** gamma * ce_loss
    if reduction == "mean":
        f_loss = f_loss.mean()
    elif reduction == "wmean":
        f_loss = f_loss.sum() / ((1 - pt) ** gamma).sum()
    return f_loss


def ref_focal_uce_loss(  # continual/method_wrapper/loss.py:16-24
    inputs, targets, old_cl, alpha=10, gamma=2, reduction="mean"
):
    ce_loss = ref_unbiased_cross_entropy_loss(inputs, targets, reduction="none", old_cl=old_cl)
    pt = torch.exp(-ce_loss)
    f_loss = alpha * (1 - pt) ** gamma * ce_loss
    if reduction == "mean":
        f_loss = f_loss.mean()
    elif reduction == "wmean":
        f_loss = f_loss.sum() / ((1 - pt) ** gamma).sum()
    return f_loss


def ref_unbiased_cross_entropy_loss(  # continual/method_wrapper/loss.py:27-37
    inputs, targets, old_cl, weights=None, reduction="mean"
):
    outputs = torch.zeros_like(inputs)  # B, C (1+V+N), H, W
    den = torch.logsumexp(inputs, dim=1)  # B, H, W       den of softmax

    to_sum = torch.cat((inputs[:, -1:], inputs[:, 0:old_cl]), dim=1)
    outputs[:, -1] = torch.logsumexp(to_sum, dim=1) - den  # B, K       p(O)
    outputs[:, :-1] = inputs[:, :-1] - den.unsqueeze(dim=1)  # B, N, K    p(N_i)

    loss = F.nll_loss(outputs, targets, weight=weights, reduction=reduction)

    return loss


def ref_unbiased_knowledge_distillation_loss(  # continual/method_wrapper/loss.py:90-106
    inputs, targets, reweight=False, gamma=2.0, temperature=1.0
):
    targets = targets * temperature

    den = torch.logsumexp(inputs, dim=1)  # B, C
    outputs_no_bgk = inputs[:, : targets.shape[1] - 1] - den.unsqueeze(dim=1)  # B, OLD_CL, Q
    outputs_bkg = torch.logsumexp(inputs[:, targets.shape[1] - 1 :], dim=1) - den  # B, Q
    labels = torch.softmax(targets, dim=1)  # B, BKG + OLD_CL, Q
    labels_soft = torch.log_softmax(targets, dim=1)

    loss = labels[:, -1] * (labels_soft[:, -1] - outputs_bkg) + (
        labels[:, :-1] * (labels_soft[:, :-1] - outputs_no_bgk)
    ).sum(dim=1)  # B, Q
    if reweight:
        loss = ((1 - labels[:, -1]) ** gamma * loss).sum() / ((1 - labels[:, -1]) ** gamma).sum()
    else:
        loss = loss.mean()
    return loss


class RefSoftmaxMatcher:  # matcher.py:139-204 (forward: matcher.py:105-126)
    def __init__(self, num_points):
        self.num_points = num_points

    @torch.no_grad()
    def memory_efficient_forward(self, outputs, targets):
        bs, num_queries = outputs["pred_logits"].shape[:2]
        indices = []
        for b in range(bs):
            out_prob = outputs["pred_logits"][b].softmax(-1)
            tgt_ids = targets[b]["labels"]
            cost_class = out_prob[:, tgt_ids]
            out_mask = outputs["pred_masks"][b].softmax(dim=0)
            tgt_mask = targets[b]["masks"].to(out_mask)
            out_mask = out_mask[:, None]
            tgt_mask = tgt_mask[:, None]
            point_coords = torch.rand(1, self.num_points, 2, device=out_mask.device)
            tgt_mask = ref_point_sample(
                tgt_mask,
                point_coords.repeat(tgt_mask.shape[0], 1, 1),
                align_corners=False,
            ).squeeze(1)
            out_mask = ref_point_sample(
                out_mask,
                point_coords.repeat(out_mask.shape[0], 1, 1),
                align_corners=False,
            ).squeeze(1)
            out_mask = out_mask.float()
            tgt_mask = tgt_mask.float()
            cost_dice = ref_batch_soft_dice_loss(out_mask, tgt_mask)
            C = -2 * (cost_class * cost_dice) / (cost_class + cost_dice)
            C = C.reshape(num_queries, -1).cpu()
            indices.append(linear_sum_assignment(C))
        return [
            (torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
            for i, j in indices
        ]

    def __call__(self, outputs, targets):
        return self.memory_efficient_forward(outputs, targets)


def ref_nested_tensor_from_tensor_list(tensor_list):  # utils/misc.py:48-70, tensors only
    max_size = [max(s) for s in zip(*[list(img.shape) for img in tensor_list])]
    batch_shape = [len(tensor_list)] + max_size
    dtype = tensor_list[0].dtype
    device = tensor_list[0].device
    tensor = torch.zeros(batch_shape, dtype=dtype, device=device)
    for img, pad_img in zip(tensor_list, tensor):
        pad_img[: img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
    return tensor


class RefSoftmaxKDSetCriterion:  # set_criterion.py:14-269 + criterion.py:212-222, one process
    def __init__(
        self,
        num_classes,
        matcher,
        num_points,
        oversample_ratio,
        importance_sample_ratio,
        deep_sup=True,
        kd_deep=False,
        alpha=1.0,
        kd_reweight=True,
        focal_alpha=5.0,
        focal_gamma=1.0,
        old_classes=0,
        uce=False,
    ):
        self.num_classes = num_classes
        self.focal = True  # SOFTMASK True FOCAL True (README.md:26-27)
        self.old_classes = old_classes
        self.uce = uce and old_classes != 0
        self.matcher = matcher
        self.losses = ["labels", "masks"]
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_sup = deep_sup
        self.kd_deep = kd_deep
        self.alpha = alpha
        self.kd_reweight = kd_reweight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def _get_src_permutation_idx(self, indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for (src, _) in indices])
        return batch_idx, src_idx

    def _get_tgt_permutation_idx(self, indices):
        batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
        tgt_idx = torch.cat([tgt for (_, tgt) in indices])
        return batch_idx, tgt_idx

    def loss_labels(self, outputs, targets, indices, num_masks, outputs_old=None):
        src_logits = outputs["pred_logits"].float()
        idx = self._get_src_permutation_idx(indices)
        target_classes = torch.full(
            src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=src_logits.device
        )
        target_classes_o = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices)])
        target_classes[idx] = target_classes_o
        if self.uce and self.focal:
            loss_ce = ref_focal_uce_loss(
                src_logits.transpose(1, 2),
                target_classes,
                old_cl=self.old_classes,
                gamma=self.focal_gamma,
                alpha=self.focal_alpha,
            )
        # (the ``elif self.uce`` branch needs FOCAL False: not restated)
        elif self.focal:
            loss_ce = ref_focal_loss(
                src_logits.transpose(1, 2),
                target_classes,
                gamma=self.focal_gamma,
                alpha=self.focal_alpha,
            )
        losses = {"loss_ce": loss_ce}
        if outputs_old is not None:
            tar_logits = outputs_old["pred_logits"].float()
            # the ``if self.ukd`` branch
            loss_kd = ref_unbiased_knowledge_distillation_loss(
                src_logits.transpose(1, 2),
                tar_logits.transpose(1, 2),
                reweight=self.kd_reweight,
                temperature=self.alpha,
            )
            losses["loss_kd"] = loss_kd
        return losses

    def loss_masks(self, outputs, targets, indices, num_masks, outputs_old=None):
        src_idx = self._get_src_permutation_idx(indices)
        tgt_idx = self._get_tgt_permutation_idx(indices)
        src_masks = outputs["pred_masks"].softmax(dim=1)
        src_log_masks = torch.log_softmax(outputs["pred_masks"], dim=1)
        src_masks = src_masks[src_idx]
        src_log_masks = src_log_masks[src_idx]
        masks = [t["masks"] for t in targets]
        target_masks = ref_nested_tensor_from_tensor_list(masks)
        target_masks = target_masks.to(src_masks)
        target_masks = target_masks[tgt_idx]
        src_masks = src_masks[:, None]
        src_log_masks = src_log_masks[:, None]
        target_masks = target_masks[:, None]
        with torch.no_grad():
            point_coords = ref_get_uncertain_point_coords_with_randomness(
                src_masks,
                lambda logits: ref_calculate_uncertainty(2 * logits - 1),
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            point_labels = ref_point_sample(
                target_masks,
                point_coords,
                align_corners=False,
            ).squeeze(1)
        point_logits = ref_point_sample(
            src_masks,
            point_coords,
            align_corners=False,
        ).squeeze(1)
        point_log_logits = ref_point_sample(
            src_log_masks,
            point_coords,
            align_corners=False,
        ).squeeze(1)
        losses = {
            "loss_mask": ref_softmax_ce_loss(point_log_logits, point_labels, num_masks),
            "loss_dice": ref_softmax_dice_loss(point_logits, point_labels, num_masks),
        }
        return losses

    def get_loss(self, loss, outputs, targets, indices, num_masks, outputs_old=None):
        loss_map = {"labels": self.loss_labels, "masks": self.loss_masks}
        return loss_map[loss](outputs, targets, indices, num_masks, outputs_old)

    def forward(self, outputs, targets, outputs_old=None, world_size=1, all_reduce=None):
        outputs_without_aux = {k: v for k, v in outputs.items() if "pred" in k}
        indices = self.matcher(outputs_without_aux, targets)
        num_masks = sum(len(t["labels"]) for t in targets)
        num_masks = torch.as_tensor(
            [num_masks], dtype=torch.float, device=next(iter(outputs.values())).device
        )
        if all_reduce is not None:
            num_masks = all_reduce(num_masks)
        num_masks = torch.clamp(num_masks / world_size, min=1).item()
        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_masks, outputs_old))
        if "aux_outputs" in outputs and self.deep_sup:
            for i, aux_outputs in enumerate(outputs["aux_outputs"]):
                indices = self.matcher(aux_outputs, targets)
                for loss in self.losses:
                    if outputs_old is not None and self.kd_deep:
                        l_dict = self.get_loss(
                            loss,
                            aux_outputs,
                            targets,
                            indices,
                            num_masks,
                            outputs_old["aux_outputs"][i],
                        )
                    else:
                        l_dict = self.get_loss(loss, aux_outputs, targets, indices, num_masks)
                    l_dict = {k + f"_{i}": v for k, v in l_dict.items()}
                    losses.update(l_dict)
        return losses

    __call__ = forward


def ref_weight_dict(kd_weight, dec_layers, deep_supervision=True):  # maskformer.py:64-73
    weight_dict = {
        "loss_ce": 2.0,
        "loss_mask": 5.0,
        "loss_dice": 5.0,
        "loss_kd": kd_weight,
        "loss_mask_kd": 0.0,
        "loss_pod": 0.0,
    }
    if deep_supervision:
        aux_weight_dict = {}
        for i in range(dec_layers - 1):
            aux_weight_dict.update({k + f"_{i}": v for k, v in weight_dict.items()})
        weight_dict.update(aux_weight_dict)
    return weight_dict


def ref_weighted_total(losses, weight_dict):  # maskformer.py:178-185 + the trainer's sum
    losses = dict(losses)
    for k in list(losses.keys()):
        if k in weight_dict:
            losses[k] = losses[k] * weight_dict[k]
        else:
            losses.pop(k)
    return sum(losses.values())


def ref_make_pseudolabels2(out, data, targets, old_classes, pseudo_thr):  # maskformer.py:98-146
    img_size = data[0]["image"].shape[-2], data[0]["image"].shape[-1]
    logits, mask = out["outputs"]["pred_logits"], out["outputs"]["pred_masks"]
    mask = F.interpolate(mask, size=img_size, mode="bilinear", align_corners=False)
    for i in range(logits.shape[0]):
        scores, labels = F.softmax(logits[i], dim=-1).max(-1)
        mask_pred = mask[i].softmax(dim=0)
        keep = labels.ne(old_classes) & (scores > pseudo_thr)
        cur_scores = scores[keep]
        cur_classes = labels[keep]
        cur_masks = mask_pred[keep]
        cur_masks_bin = mask_pred[keep].clone()
        cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks
        tar = targets[i]
        gt_pixels = tar["masks"].sum(dim=0).bool()
        keep2 = torch.zeros(len(cur_masks)).bool()
        if cur_masks.shape[0] > 0:
            cur_mask_ids = cur_prob_masks.argmax(0)
            cur_mask_ids[gt_pixels] = -1
            for k in range(cur_classes.shape[0]):
                mask_area = (cur_mask_ids == k).sum().item()
                original_area = (cur_masks[k] >= 0.5).sum().item()
                x_mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)
                if mask_area > 0 and original_area > 0 and x_mask.sum().item() > 0:  # noqa: SIM102
                    if mask_area / original_area > 0.5:
                        keep2[k] = 1
                        cur_masks_bin[k] = x_mask
        if keep2.sum() > 0:
            pseudo_lab = cur_classes[keep2]
            pseudo_mask = cur_masks_bin[keep2].bool()
            tar["masks"] = torch.cat((tar["masks"], pseudo_mask), dim=0)
            tar["labels"] = torch.cat((tar["labels"], pseudo_lab), dim=0)
    return targets


def ref_semantic_inference(  # maskformer_model.py:332-376, softmask and not mask_bg
    mask_cls, mask_pred, num_classes, object_mask_threshold=0.0, overlap_threshold=0.0
):
    mask_threshold = 0.5
    mask_pred = mask_pred.softmax(dim=0)
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    h, w = mask_pred.shape[-2:]
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores = scores[keep]
    cur_classes = labels[keep]
    cur_masks = mask_pred[keep]
    cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks
    semseg = torch.zeros((h, w), dtype=torch.long, device=cur_masks.device)
    if cur_masks.shape[0] == 0:
        semseg = F.one_hot(semseg, num_classes + 1).float().permute(2, 0, 1)
    else:
        cur_mask_ids = cur_prob_masks.argmax(0)
        for k in range(cur_classes.shape[0]):
            pred_class = cur_classes[k].item()
            mask_area = (cur_mask_ids == k).sum().item()
            original_area = (cur_masks[k] >= mask_threshold).sum().item()
            mask = (cur_mask_ids == k) & (cur_masks[k] >= mask_threshold)
            if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
                if mask_area / original_area < overlap_threshold:
                    continue
                semseg[mask] = pred_class + 1
        semseg = F.one_hot(semseg, num_classes + 1).float().permute(2, 0, 1)
    return semseg


# ---- helpers -------------------------------------------------------------------------------


def random_targets(gen, counts, num_classes, size):
    targets = []
    for n in counts:
        labels = torch.randperm(num_classes, generator=gen)[:n]
        masks = torch.rand(n, *size, generator=gen) > 0.5
        targets.append({"labels": labels, "masks": masks})
    return targets


def random_outputs(gen, batch, queries, num_classes, size, num_aux):
    def one():
        return {
            "pred_logits": 2 * torch.randn(batch, queries, num_classes + 1, generator=gen),
            "pred_masks": 3 * torch.randn(batch, queries, *size, generator=gen),
        }

    outputs = one()
    outputs["aux_outputs"] = [one() for _ in range(num_aux)]
    return outputs


def clone_outputs(outputs):
    def one(s):
        return {
            k: s[k].detach().clone().requires_grad_(True) for k in ("pred_logits", "pred_masks")
        }

    cloned = one(outputs)
    cloned["aux_outputs"] = [one(a) for a in outputs.get("aux_outputs", [])]
    return cloned


def leaves(outputs):
    stages = [outputs] + outputs.get("aux_outputs", [])
    return [t for s in stages for t in (s["pred_logits"], s["pred_masks"])]


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def run_both(outputs, targets, old_logits, weights, seed, use_generator, num_old=None):
    """Official and incseg losses and weighted-total gradients from one seed.

    ``num_old`` defaults to the old logits' class count (0 without them)."""
    num_classes = outputs["pred_logits"].shape[-1] - 1
    if num_old is None:
        num_old = 0 if old_logits is None else old_logits.shape[-1] - 1
    ref_out, our_out = clone_outputs(outputs), clone_outputs(outputs)
    criterion = RefSoftmaxKDSetCriterion(
        num_classes,
        RefSoftmaxMatcher(weights.num_points),
        weights.num_points,
        weights.oversample_ratio,
        weights.importance_sample_ratio,
        deep_sup=weights.deep_supervision,
        kd_reweight=weights.kd_reweight_gamma is not None,
        alpha=weights.kd_alpha,
        focal_alpha=weights.focal_alpha,
        focal_gamma=weights.focal_gamma,
        old_classes=num_old,
        uce=weights.uce,
    )
    torch.manual_seed(seed)
    outputs_old = None if old_logits is None else {"pred_logits": old_logits}
    ref_losses = criterion(ref_out, targets, outputs_old)
    ref_next = torch.rand(3)  # where the official leaves the global generator
    generator = torch.Generator().manual_seed(seed) if use_generator else None
    torch.manual_seed(seed)
    losses = cl.comformer_criterion(
        our_out, targets, num_old, old_logits, weights, generator=generator
    )
    if not use_generator:
        assert torch.equal(torch.rand(3), ref_next)  # the same number of draws
    assert list(losses) == list(ref_losses)
    for key in ref_losses:
        torch.testing.assert_close(losses[key], ref_losses[key], rtol=0, atol=1e-6, msg=key)
    num_aux = len(outputs["aux_outputs"])
    ref_total = ref_weighted_total(
        ref_losses, ref_weight_dict(weights.kd_weight, num_aux + 1, weights.deep_supervision)
    )
    total = cl.weighted_total(losses, weights)
    close(total, ref_total, atol=1e-5)
    ref_total.backward()
    total.backward()
    for ours, ref in zip(leaves(our_out), leaves(ref_out)):
        if ref.grad is None:
            assert ours.grad is None
        else:
            close(ours.grad, ref.grad)
    return losses


# ---- equality with the official code --------------------------------------------------------


@pytest.mark.parametrize("alpha, gamma", [(5.0, 1.0), (10.0, 2.0)])
def test_focal_ce_matches_official(alpha, gamma):
    gen = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(3, 6, 7, generator=gen)).requires_grad_(True)
    targets = torch.randint(0, 6, (3, 7), generator=gen)
    targets[0, 2] = 255
    ours_in = logits.detach().transpose(1, 2).reshape(-1, 6).requires_grad_(True)
    ref = ref_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    ours = cl.focal_ce(ours_in, targets.reshape(-1), alpha=alpha, gamma=gamma)
    close(ours, ref)
    ref.backward()
    ours.backward()
    close(ours_in.grad, logits.grad.transpose(1, 2).reshape(-1, 6))


@pytest.mark.parametrize("num_old", [0, 1, 3, 5])
@pytest.mark.parametrize("alpha, gamma", [(5.0, 1.0), (10.0, 2.0)])
def test_unbiased_focal_ce_matches_official(num_old, alpha, gamma):
    gen = torch.Generator().manual_seed(14)
    logits = (2 * torch.randn(3, 6, 7, generator=gen)).requires_grad_(True)  # (B, K + 1, Q)
    targets = torch.randint(0, 6, (3, 7), generator=gen)
    targets[:, :3] = 5  # no-object
    targets[0, 3] = 0  # an old class (when num_old > 0)
    ref = ref_focal_uce_loss(logits, targets, num_old, alpha=alpha, gamma=gamma)
    ours_in = logits.detach().clone().requires_grad_(True)
    ours = cl.unbiased_focal_ce(ours_in, targets, num_old, alpha=alpha, gamma=gamma)
    close(ours, ref)
    ref.backward()
    ours.backward()
    close(ours_in.grad, logits.grad)
    # The (N, K + 1) layout gives the same number.
    flat = cl.unbiased_focal_ce(
        logits.detach().transpose(1, 2).reshape(-1, 6), targets.reshape(-1), num_old, alpha, gamma
    )
    close(flat, ref.detach())
    if num_old == 0:  # nothing merged: the plain focal CE
        close(ours.detach(), cl.focal_ce(logits.detach(), targets, alpha, gamma))


@pytest.mark.parametrize("reweight, temperature", [(True, 1.0), (False, 1.0), (True, 2.0)])
def test_unbiased_kd_matches_official(reweight, temperature):
    gen = torch.Generator().manual_seed(1)
    new = (2 * torch.randn(2, 5, 8, generator=gen)).requires_grad_(True)
    old = 2 * torch.randn(2, 5, 4, generator=gen)
    ours_new = new.detach().clone().requires_grad_(True)
    ref = ref_unbiased_knowledge_distillation_loss(
        new.transpose(1, 2), old.transpose(1, 2), reweight=reweight, temperature=temperature
    )
    ours = cl.unbiased_kd(ours_new, old, temperature, 2.0 if reweight else None)
    close(ours, ref)
    ref.backward()
    ours.backward()
    close(ours_new.grad, new.grad)


@pytest.mark.parametrize("use_generator", [False, True])
def test_softmax_matcher_matches_official(use_generator):
    gen = torch.Generator().manual_seed(2)
    outputs = random_outputs(gen, 3, 6, 9, (10, 12), 0)
    targets = random_targets(gen, [3, 0, 6], 9, (10, 12))
    torch.manual_seed(7)
    ref = RefSoftmaxMatcher(300)(outputs, targets)
    torch.manual_seed(7)
    generator = torch.Generator().manual_seed(7) if use_generator else None
    ours = cl.softmax_matcher(
        outputs["pred_logits"], outputs["pred_masks"], targets, 300, generator=generator
    )
    assert len(ours) == 3
    for (i, j), (ri, rj) in zip(ours, ref):
        assert torch.equal(i, ri) and torch.equal(j, rj)
    assert [len(i) for i, _ in ours] == [3, 0, 6]


def test_softmax_mask_losses_matches_official():
    gen = torch.Generator().manual_seed(3)
    outputs = random_outputs(gen, 2, 5, 6, (9, 11), 0)
    targets = random_targets(gen, [2, 4], 6, (9, 11))
    indices = RefSoftmaxMatcher(200)(outputs, targets)
    ref_masks = outputs["pred_masks"].clone().requires_grad_(True)
    our_masks = outputs["pred_masks"].clone().requires_grad_(True)
    criterion = RefSoftmaxKDSetCriterion(6, None, 500, 3.0, 0.75)
    torch.manual_seed(11)
    ref = criterion.loss_masks({"pred_masks": ref_masks}, targets, indices, 3.0)
    torch.manual_seed(11)
    ours = cl.softmax_mask_losses(our_masks, indices, targets, 3.0, 500, 3.0, 0.75)
    assert list(ours) == ["loss_mask", "loss_dice"]
    for key in ref:
        close(ours[key], ref[key])
    (ref["loss_mask"] + 2 * ref["loss_dice"]).backward()
    (ours["loss_mask"] + 2 * ours["loss_dice"]).backward()
    close(our_masks.grad, ref_masks.grad)


@pytest.mark.parametrize("use_generator", [False, True])
@pytest.mark.parametrize("with_old", [False, True])
def test_criterion_matches_official(use_generator, with_old):
    gen = torch.Generator().manual_seed(4)
    outputs = random_outputs(gen, 2, 7, 8, (10, 10), 2)
    targets = random_targets(gen, [3, 5], 8, (10, 10))
    old = 2 * torch.randn(2, 7, 6, generator=gen) if with_old else None
    weights = cl.CoMFormerWeights(num_points=400)
    losses = run_both(outputs, targets, old, weights, seed=5, use_generator=use_generator)
    expected = ["loss_ce"] + (["loss_kd"] if with_old else []) + ["loss_mask", "loss_dice"]
    expected += [f"{k}_{i}" for i in range(2) for k in ("loss_ce", "loss_mask", "loss_dice")]
    assert list(losses) == expected  # KD on the final layer only


def test_criterion_matches_official_at_ade_defaults():
    gen = torch.Generator().manual_seed(6)
    outputs = random_outputs(gen, 2, 6, 10, (16, 16), 1)
    targets = random_targets(gen, [4, 2], 10, (16, 16))
    old = 2 * torch.randn(2, 6, 8, generator=gen)
    run_both(outputs, targets, old, cl.CoMFormerWeights(), seed=0, use_generator=False)


def test_criterion_matches_official_without_deep_supervision_or_reweighting():
    gen = torch.Generator().manual_seed(8)
    outputs = random_outputs(gen, 2, 5, 6, (8, 8), 2)
    targets = random_targets(gen, [1, 3], 6, (8, 8))
    old = torch.randn(2, 5, 4, generator=gen)
    weights = cl.CoMFormerWeights(
        num_points=200, deep_supervision=False, kd_reweight_gamma=None, kd_alpha=2.0
    )
    losses = run_both(outputs, targets, old, weights, seed=3, use_generator=True)
    assert list(losses) == ["loss_ce", "loss_kd", "loss_mask", "loss_dice"]


def mib_weights(**kw):
    """MiB on Mask2Former (README.md:32-33): KD_WEIGHT 200, UKD True, UCE True, KD_REW off."""
    return cl.CoMFormerWeights(uce=True, kd_reweight_gamma=None, kd_weight=200.0, **kw)


@pytest.mark.parametrize("use_generator", [False, True])
def test_criterion_mib_matches_official(use_generator):
    gen = torch.Generator().manual_seed(15)
    outputs = random_outputs(gen, 2, 7, 8, (10, 10), 2)
    targets = random_targets(gen, [3, 5], 8, (10, 10))
    old = 2 * torch.randn(2, 7, 6, generator=gen)  # Ko = 5 of K = 8
    weights = mib_weights(num_points=400)
    losses = run_both(outputs, targets, old, weights, seed=5, use_generator=use_generator)
    expected = ["loss_ce", "loss_kd", "loss_mask", "loss_dice"]
    expected += [f"{k}_{i}" for i in range(2) for k in ("loss_ce", "loss_mask", "loss_dice")]
    assert list(losses) == expected
    # UCE changes the class loss of every output, aux included, and nothing else.
    torch.manual_seed(5)
    plain = cl.comformer_criterion(
        clone_outputs(outputs), targets, 5, old, cl.CoMFormerWeights(num_points=400, kd_weight=200)
    )
    for key in expected:
        if key.startswith("loss_ce"):
            assert (losses[key] - plain[key]).abs() > 1e-3, key
        elif key != "loss_kd":  # plain reweights the KD
            close(losses[key], plain[key])


def test_criterion_mib_matches_official_at_ade_defaults():
    gen = torch.Generator().manual_seed(16)
    outputs = random_outputs(gen, 2, 6, 10, (16, 16), 1)
    targets = random_targets(gen, [4, 2], 10, (16, 16))
    old = 2 * torch.randn(2, 6, 8, generator=gen)
    run_both(outputs, targets, old, mib_weights(), seed=0, use_generator=False)


def test_criterion_uce_without_old_logits_or_old_classes():
    gen = torch.Generator().manual_seed(17)
    outputs = random_outputs(gen, 2, 5, 6, (8, 8), 1)
    targets = random_targets(gen, [2, 3], 6, (8, 8))
    weights = mib_weights(num_points=200)
    # UCE needs only the old class count, not the old model's logits.
    with_uce = run_both(outputs, targets, None, weights, seed=2, use_generator=True, num_old=3)
    assert list(with_uce) == ["loss_ce", "loss_mask", "loss_dice"] + [
        "loss_ce_0",
        "loss_mask_0",
        "loss_dice_0",
    ]
    # No old classes: the official turns UCE off (set_criterion.py:31); the focal CE.
    first = run_both(outputs, targets, None, weights, seed=2, use_generator=True, num_old=0)
    torch.manual_seed(2)
    plain = cl.comformer_criterion(
        clone_outputs(outputs), targets, 0, None, cl.CoMFormerWeights(num_points=200)
    )
    for key in plain:
        assert torch.equal(first[key], plain[key]), key


def test_criterion_with_no_targets_matches_official():
    gen = torch.Generator().manual_seed(9)
    outputs = random_outputs(gen, 2, 4, 5, (8, 8), 1)
    targets = random_targets(gen, [0, 2], 5, (8, 8))
    run_both(outputs, targets, None, cl.CoMFormerWeights(num_points=100), 1, False)


def test_criterion_num_masks_over_processes():
    gen = torch.Generator().manual_seed(10)
    outputs = random_outputs(gen, 1, 4, 5, (8, 8), 0)
    targets = random_targets(gen, [2], 5, (8, 8))
    criterion = RefSoftmaxKDSetCriterion(5, RefSoftmaxMatcher(100), 100, 3.0, 0.75)
    torch.manual_seed(0)
    # another process holds 6 masks: all_reduce gives 8, world size 2 gives 4
    ref = criterion(outputs, targets, None, world_size=2, all_reduce=lambda x: x + 6)
    torch.manual_seed(0)
    ours = cl.comformer_criterion(
        outputs,
        targets,
        0,
        None,
        cl.CoMFormerWeights(num_points=100),
        mean_over_processes=lambda x: (x + 6) / 2,
    )
    for key in ref:
        close(ours[key], ref[key])


def test_pseudo_labels_matches_official():
    gen = torch.Generator().manual_seed(12)
    appended = dropped = 0
    for threshold in (0.0, 0.3):
        for _ in range(4):
            num_old = 5
            logits = 3 * torch.randn(2, 8, num_old + 1, generator=gen)
            masks = 4 * torch.randn(2, 8, 4, 5, generator=gen)
            label_maps = torch.randint(0, 12, (2, 16, 20), generator=gen)
            label_maps[label_maps >= 9] = 0  # background, not a target
            targets = [cl.targets_from_label_map(m) for m in label_maps]
            ref = ref_make_pseudolabels2(
                {"outputs": {"pred_logits": logits, "pred_masks": masks}},
                [{"image": torch.zeros(3, 16, 20)}],
                [dict(t) for t in targets],
                num_old,
                threshold,
            )
            big = F.interpolate(masks, size=(16, 20), mode="bilinear", align_corners=False)
            for b in range(2):
                ours = cl.pseudo_labels(logits[b], big[b], targets[b], threshold)
                assert torch.equal(ours["labels"], ref[b]["labels"])
                assert torch.equal(ours["masks"], ref[b]["masks"])
                extra = len(ours["labels"]) - len(targets[b]["labels"])
                kept = (F.softmax(logits[b], -1).argmax(-1) != num_old).sum().item()
                appended += extra
                dropped += kept - extra
    assert appended > 0 and dropped > 0  # both outcomes were exercised


def test_inference_matches_official():
    gen = torch.Generator().manual_seed(13)
    for object_threshold, overlap in [(0.0, 0.0), (0.4, 0.8)]:
        logits = 2 * torch.randn(3, 9, 7, generator=gen)
        masks = 3 * torch.randn(3, 9, 12, 10, generator=gen)
        logits[2, :, -1] = 50.0  # every query is no-object: nothing kept
        ours = cl.comformer_inference(logits, masks, object_threshold, overlap)
        assert ours.shape == (3, 12, 10) and ours.dtype == torch.long
        onehot = cl.one_hot_scores(ours, 6)
        for b in range(3):
            ref = ref_semantic_inference(logits[b], masks[b], 6, object_threshold, overlap)
            assert torch.equal(onehot[b], ref)
        assert (ours[2] == 0).all() and (ours[:2] > 0).any()


# ---- hand-computed cases ---------------------------------------------------------------------


def test_focal_by_hand():
    # p(target) = 1 / (1 + 3) = 1/4: CE = ln 4, (1 - p_t) = 3/4, loss = 5 * 3/4 * ln 4.
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    targets = torch.tensor([0, 255])  # the ignored one adds 0 but counts in the mean
    expected = 5 * 0.75 * math.log(4.0) / 2
    close(cl.focal_ce(logits, targets), torch.tensor(expected))


def test_unbiased_focal_ce_by_hand_one_old_class():
    # Classes 0 (old), 1 (new), no-object 2; softmax (1, 2, 3) / 6 for every query.
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0]] * 3))
    targets = torch.tensor([2, 0, 1])  # no-object, old, new
    p = [3 / 6 + 1 / 6, 1 / 6, 2 / 6]  # p_bg = p(no-object) + p(old)
    expected = sum(5 * (1 - q) * -math.log(q) for q in p) / 3
    close(cl.unbiased_focal_ce(logits, targets, 1), torch.tensor(expected))
    # Plain focal: p(no-object) alone, 1/2.
    p[0] = 3 / 6
    close(
        cl.focal_ce(logits, targets), torch.tensor(sum(5 * (1 - q) * -math.log(q) for q in p) / 3)
    )
    # alpha 1, gamma 0: the unbiased CE itself, -log(2/3) for the no-object query.
    only_bg = cl.unbiased_focal_ce(logits[:1], targets[:1], 1, alpha=1.0, gamma=0.0)
    close(only_bg, torch.tensor(math.log(1.5)))


def test_unbiased_focal_ce_rejects_bad_old_class_count():
    logits, targets = torch.zeros(2, 3), torch.tensor([0, 2])
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="num_old_classes"):
            cl.unbiased_focal_ce(logits, targets, bad)


def test_unbiased_kd_zero_when_new_equals_old():
    logits = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(0))
    close(cl.unbiased_kd(logits, logits.clone()), torch.tensor(0.0))
    close(cl.unbiased_kd(logits, logits.clone(), reweight_gamma=None), torch.tensor(0.0))


def test_unbiased_kd_by_hand_one_old_class():
    # One old class (Ko = 1) and one new class; new logits all 0: p(old) = 1/3, and the new
    # class is merged with no-object, 2/3.
    old = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # q = (1/2, 1/2), (3/4, 1/4)
    new = torch.zeros(1, 2, 3)
    kl1 = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
    kl2 = 0.75 * math.log(0.75 / (1 / 3)) + 0.25 * math.log(0.25 / (2 / 3))
    w1, w2 = 0.5**2, 0.75**2  # (1 - q_no_object) ** 2
    close(cl.unbiased_kd(new, old), torch.tensor((w1 * kl1 + w2 * kl2) / (w1 + w2)))
    close(cl.unbiased_kd(new, old, reweight_gamma=None), torch.tensor((kl1 + kl2) / 2))


def test_unbiased_kd_rejects_more_old_classes():
    with pytest.raises(ValueError, match="no more old classes"):
        cl.unbiased_kd(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def two_query_masks():
    """Mask logits whose softmax over the 2 queries is p0 = 0.9 | 0.4 | 0.1 by column."""
    p0 = torch.tensor([0.9, 0.4, 0.1]).expand(3, 3)
    return torch.stack([p0.log(), (1 - p0).log()])


def test_pseudo_labels_by_hand():
    # Query 0: class 0 with score 0.8; query 1: class 1 with score 0.5 (Ko = 2, no-object 2).
    logits = torch.tensor([[math.log(8.0), 0.0, 0.0], [0.0, math.log(2.0), 0.0]])
    masks = two_query_masks()
    # score * p: column 0: 0.72 vs 0.05, column 1: 0.32 vs 0.30, column 2: 0.08 vs 0.45.
    gt = torch.zeros(1, 3, 3, dtype=torch.bool)
    gt[0, 0, 0] = True
    target = {"labels": torch.tensor([4]), "masks": gt}
    out = cl.pseudo_labels(logits, masks, target)
    # Query 0 owns columns 0-1 but the GT pixel: 5 pixels, p0 >= 0.5 on column 0 only: 3;
    # 5/3 > 0.5 -> kept, mask = column 0 without the GT pixel (column 1 has p0 = 0.4).
    # Query 1 owns column 2 (3 pixels), p1 >= 0.5 on columns 1-2 (6): 3/6 = 0.5 -> dropped.
    expected = torch.zeros(3, 3, dtype=torch.bool)
    expected[1:, 0] = True
    assert out["labels"].tolist() == [4, 0]
    assert torch.equal(out["masks"], torch.stack([gt[0], expected]))
    assert target["labels"].tolist() == [4]  # the input is not modified
    # A threshold above both scores keeps no query: the target is unchanged.
    same = cl.pseudo_labels(logits, masks, target, threshold=0.9)
    assert same["labels"].tolist() == [4] and torch.equal(same["masks"], gt)


def test_pseudo_labels_needs_upsampled_masks():
    target = {"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4, dtype=torch.bool)}
    with pytest.raises(ValueError, match="upsample"):
        cl.pseudo_labels(torch.zeros(2, 3), torch.zeros(2, 2, 2), target)


def test_inference_by_hand():
    # Query 0 softmax: (1, 1, 8, 1) / 11 -> class 2, 8/11; query 1: (2, 1, 1, 1) / 5 -> class 0, 0.4.
    logits = torch.tensor([[[0.0, 0.0, math.log(8.0), 0.0], [math.log(2.0), 0.0, 0.0, 0.0]]])
    masks = two_query_masks()[None]
    seg = cl.comformer_inference(logits, masks)
    # Column 0: query 0 (p = 0.9) paints 2 + 1; column 1: query 0 wins score * p (0.29 vs 0.24)
    # but p0 = 0.4 < 0.5: left 0; column 2: query 1 (p = 0.9) paints 0 + 1.
    assert seg.tolist() == [[[3, 0, 1]] * 3]
    # Query 1 owns 3 pixels of its 6 with p >= 0.5: 0.5 < 0.6 -> skipped.
    seg = cl.comformer_inference(logits, masks, overlap_threshold=0.6)
    assert seg.tolist() == [[[3, 0, 0]] * 3]
    # Query 1's score 0.4 is not above 0.45: dropped, so query 0 owns every pixel.
    seg = cl.comformer_inference(logits, masks, object_threshold=0.45)
    assert seg.tolist() == [[[3, 0, 0]] * 3]
    onehot = cl.one_hot_scores(seg, 3)
    assert onehot.shape == (1, 4, 3, 3) and onehot[0, 3, :, 0].tolist() == [1.0] * 3


def test_targets_from_label_map():
    label = torch.tensor([[0, 3, 3], [255, 1, 0]])
    target = cl.targets_from_label_map(label)
    assert target["labels"].tolist() == [0, 2]  # dataset classes 1 and 3, background dropped
    assert target["masks"].tolist() == [
        [[False, False, False], [False, True, False]],
        [[False, True, True], [False, False, False]],
    ]


def test_softmax_matcher_by_hand():
    # Two queries, two targets on 1 x 2 images; query 0 is class 1 and covers pixel 1.
    logits = torch.tensor([[[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]]])
    masks = torch.tensor([[[[-5.0, 5.0]], [[5.0, -5.0]]]])
    target = {"labels": torch.tensor([0, 1]), "masks": torch.tensor([[[1, 0]], [[0, 1]]])}
    (rows, cols) = cl.softmax_matcher(logits, masks, [target], num_points=50)[0]
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]


def test_weighted_total_uses_ce_2_mask_5_dice_5_kd_weight():
    losses = {
        "loss_ce": torch.tensor(1.0),
        "loss_kd": torch.tensor(1.0),
        "loss_mask": torch.tensor(1.0),
        "loss_dice": torch.tensor(1.0),
        "loss_ce_0": torch.tensor(2.0),
        "loss_mask_0": torch.tensor(2.0),
        "loss_dice_0": torch.tensor(2.0),
        "loss_other": torch.tensor(100.0),
    }
    total = cl.weighted_total(losses, cl.CoMFormerWeights())
    close(total, torch.tensor(2 + 10 + 5 + 5 + 2 * (2 + 5 + 5.0)))
    weights = cl.CoMFormerWeights(kd_weight=0.5, deep_supervision=False)
    close(cl.weighted_total(losses, weights), torch.tensor(2 + 0.5 + 5 + 5.0))


def test_point_sampling_rejects_bad_ratios():
    masks = torch.zeros(1, 2, 4, 4)
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4)}]
    with pytest.raises(ValueError, match="oversample_ratio"):
        cl.softmax_mask_losses(masks, indices, targets, 1.0, 10, 0.5, 0.75)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        cl.softmax_mask_losses(masks, indices, targets, 1.0, 10, 3.0, 1.5)
