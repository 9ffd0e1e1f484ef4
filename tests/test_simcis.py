"""SimCIS (``simcis``) against literal re-statements of SooLab/SimCIS 28bc91e: the query-selection
decoder's forward (``mask2former_transformer_decoder.py:493-796``), its proposals and box sine
embedding, the matcher with box costs (``matcher.py:95-175``), the focal class loss with virtual
queries (``criterion.py:24-54, 157-215, 571-600``), the KL term, the pseudo targets joined per
class (``maskformer_model.py:450-547``), the inference (``:551-591``); the method's bank,
collection pass and sampling; the no-prediction channel in evaluation; config checks; a tiny run
that resumes exactly after a kill in the collection pass and in step 1."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from incseg import simcis_losses as sl
from incseg.config import load_config
from incseg.errors import ConfigError
from incseg.metrics import StepReport
from incseg.models.mask2former.decoder import DecoderSizes
from incseg.models.mask2former.selection import (
    SelectionDecoder,
    SelectionInputs,
    box_sine_embedding,
    encoder_proposals,
    inverse_sigmoid,
)
from incseg.query_losses import CriterionWeights, point_sample
from incseg.report import format_step_table
from tests.helpers.method_runs import check_exact_resume, run_method
from tests.test_query_model import M2F_SETS

SIZES = DecoderSizes(
    hidden_dim=16, num_queries=5, nheads=2, dim_feedforward=32, dec_layers=3, mask_dim=16
)


def ref_proposals(memory, shapes):
    """``gen_encoder_output_proposals_p`` (utils.py:33-70), no padding mask."""
    n, s, _ = memory.shape
    mask = torch.zeros(n, s, dtype=torch.bool)
    proposals, cur = [], 0
    for lvl, (h, w) in enumerate(shapes):
        flat = mask[:, cur : cur + h * w].view(n, h, w, 1)
        valid_h = torch.sum(~flat[:, :, 0, 0], 1)
        valid_w = torch.sum(~flat[:, 0, :, 0], 1)
        gy, gx = torch.meshgrid(
            torch.linspace(0, h - 1, h, dtype=torch.float32),
            torch.linspace(0, w - 1, w, dtype=torch.float32),
            indexing="ij",
        )
        grid = torch.cat([gx.unsqueeze(-1), gy.unsqueeze(-1)], -1)
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
        proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
        cur += h * w
    out = torch.cat(proposals, 1)
    valid = ((out > 0.01) & (out < 0.99)).all(-1, keepdim=True)
    out = torch.log(out / (1 - out))
    out = out.masked_fill(mask.unsqueeze(-1), float("inf")).masked_fill(~valid, float("inf"))
    memory = memory.masked_fill(mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
    return memory, out


def ref_sine(pos, n=128):
    """``_gen_sineembed_for_position`` (decoder.py:687-713) with ``n`` for its 128."""
    scale = 2 * math.pi
    dim_t = torch.arange(n, dtype=torch.float32)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="trunc") / n)
    parts = []
    for k in (1, 0, 2, 3):
        e = pos[:, :, k] * scale
        p = e[:, :, None] / dim_t
        parts.append(torch.stack((p[:, :, 0::2].sin(), p[:, :, 1::2].cos()), dim=3).flatten(2))
    return torch.cat(parts, dim=2)


def test_proposals_and_sine_embedding_match_the_official_and_a_hand_case():
    memory = torch.randn(2, 1 * 2 + 2 * 2 + 64 * 64, 4)
    shapes = [(1, 2), (2, 2), (64, 64)]
    mine = encoder_proposals(memory, shapes)
    ref = ref_proposals(memory, shapes)
    assert torch.equal(mine[0], ref[0]) and torch.equal(mine[1], ref[1])
    # level 0, cell (x=1, y=0) of a 1x2 grid: centre (0.75, 0.5), side 0.05, in logit space
    expected = torch.tensor([0.75, 0.5, 0.05, 0.05]).logit()
    assert torch.allclose(mine[1][0, 1], expected)
    # level 2 (64x64): side 0.2 valid, but the first cell's centre 0.5/64 < 0.01 is not
    assert torch.isinf(mine[1][0, 6]).all() and (mine[0][0, 6] == 0).all()
    boxes = torch.rand(7, 2, 4)
    assert torch.allclose(box_sine_embedding(boxes, 128), ref_sine(boxes), atol=1e-6)
    assert torch.allclose(box_sine_embedding(boxes, 8), ref_sine(boxes, 8), atol=1e-6)


def ref_decoder_forward(d, x, mf, fake=None, positions=None):
    """The official ``forward`` / ``forward_decoder`` (decoder.py:493-660, 739-796) on ``d``'s
    submodules, SimCIS's attention-mask rule and box update, written out."""
    src, pos, size_list = [], [], []
    for i in range(3):
        size_list.append(x[i].shape[-2:])
        pos.append(d.pe_layer(x[i], None).flatten(2).permute(2, 0, 1))
        src.append(
            (d.input_proj[i](x[i]).flatten(2) + d.level_embed.weight[i][None, :, None]).permute(
                2, 0, 1
            )
        )
    feats = torch.cat(src, 0)
    memory, ref = ref_proposals(feats.transpose(0, 1), size_list)
    memory = d.encoder_norm(d.enc_output(memory))
    coords = d._bbox_embed(memory) + ref
    cls = d.class_embed(d.decoder_norm(memory))
    topk = torch.topk(cls.max(-1)[0], d.num_queries, dim=1)[1]
    hid = memory.shape[-1]
    tgt = torch.gather(memory, 1, topk.unsqueeze(-1).repeat(1, 1, hid))
    vq = 0
    if fake is not None:
        vq = fake.shape[1]
        tgt = torch.cat([tgt, fake], 1)
    ref_unsig = torch.gather(coords, 1, topk.unsqueeze(-1).repeat(1, 1, 4))
    output = tgt.permute(1, 0, 2).detach()
    interm = d.forward_prediction_heads(tgt.transpose(0, 1), mf, size_list[0])
    refpoint = ref_unsig.sigmoid().transpose(0, 1).detach()
    if vq:
        refpoint = F.pad(refpoint, (0, 0, 0, 0, 0, vq))

    def decode(output, refpoint, attn_mask, vq):
        preds = []
        for i in range(d.num_layers):
            sine = ref_sine(refpoint, hid // 2)
            query_embed = d.query_scale(output) * d.ref_point_head(sine)
            level = i % 3
            attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
            if vq:
                fake_embed = output[-vq:]
                output = d.transformer_self_attention_layers[i](
                    output[:-vq],
                    tgt_mask=None,
                    tgt_key_padding_mask=None,
                    query_pos=query_embed[:-vq],
                )
                output = d.transformer_cross_attention_layers[i](
                    output,
                    src[level],
                    memory_mask=attn_mask[:, :-vq, :],
                    memory_key_padding_mask=None,
                    pos=pos[level],
                    query_pos=query_embed[:-vq],
                )
                output = torch.cat([output, fake_embed], 0)
            else:
                output = d.transformer_self_attention_layers[i](
                    output, tgt_mask=None, tgt_key_padding_mask=None, query_pos=query_embed
                )
                output = d.transformer_cross_attention_layers[i](
                    output,
                    src[level],
                    memory_mask=attn_mask,
                    memory_key_padding_mask=None,
                    pos=pos[level],
                    query_pos=query_embed,
                )
            output = d.transformer_ffn_layers[i](output)
            c, m, attn_mask = d.forward_prediction_heads(output, mf, size_list[(i + 1) % 3])
            new = (d.bbox_embed[i](output) + inverse_sigmoid(refpoint)).sigmoid()
            refpoint = new.detach()
            preds.append((c, m, new.transpose(0, 1)))
        return preds

    preds = decode(output, refpoint, interm[2].clone(), vq)
    distill = None
    if positions is not None:
        dt = torch.gather(memory, 1, positions.unsqueeze(-1).repeat(1, 1, hid))
        logits, _, dmask = d.forward_prediction_heads(dt.transpose(0, 1), mf, size_list[0])
        dref = torch.gather(coords, 1, topk.unsqueeze(-1).repeat(1, 1, 4))
        dref = dref.sigmoid().transpose(0, 1).detach()
        distill = (decode(dt.permute(1, 0, 2).detach(), dref, dmask, 0)[-1][0], logits)
    return preds, interm, topk, tgt, distill


def _decoder():
    torch.manual_seed(0)
    d = SelectionDecoder(16, 7, SIZES)
    torch.nn.init.normal_(d._bbox_embed.layers[-1].weight, std=0.2)  # boxes that move
    x = [torch.randn(2, 16, 2, 2), torch.randn(2, 16, 4, 4), torch.randn(2, 16, 8, 8)]
    return d, x, torch.randn(2, 16, 16, 16)


def test_decoder_matches_the_official_forward_with_virtual_queries_and_distillation():
    d, x, mf = _decoder()
    fake = torch.randn(2, 3, 16)
    positions = torch.tensor([[0, 3, 5, 7, 9], [1, 2, 4, 6, 8]])
    out = d(x, mf, inputs=SelectionInputs(virtual=fake, distill_positions=positions))
    preds, interm, topk, tgt, distill = ref_decoder_forward(d, x, mf, fake, positions)
    assert torch.equal(out["topk"], topk) and torch.allclose(out["selected"], tgt)
    for key, k in (("pred_logits", 0), ("pred_masks", 1), ("pred_boxes", 2)):
        assert torch.allclose(out[key], preds[-1][k], atol=1e-5)
        for aux, ref in zip(out["aux_outputs"], preds[:-1], strict=True):
            assert torch.allclose(aux[key], ref[k], atol=1e-5)
    assert torch.allclose(out["interm"]["pred_logits"], interm[0], atol=1e-5)
    assert out["interm"]["pred_boxes"].shape == (2, 8, 4)
    assert torch.allclose(out["distill"]["pred_logits"], distill[0], atol=1e-5)
    assert torch.allclose(out["distill"]["interm_logits"], distill[1], atol=1e-5)


def test_virtual_queries_change_nothing_of_the_real_ones_and_only_pass_the_ffns():
    d, x, mf = _decoder()
    d.eval()
    plain = d(x, mf)
    fake = torch.randn(2, 3, 16)
    mixed = d(x, mf, inputs=SelectionInputs(virtual=fake))
    assert torch.allclose(plain["pred_logits"], mixed["pred_logits"][:, :5], atol=1e-6)
    state = fake.transpose(0, 1)
    for ffn in d.transformer_ffn_layers:
        state = ffn(state)
    expected = d.class_embed(d.decoder_norm(state)).transpose(0, 1)
    assert torch.allclose(mixed["pred_logits"][:, 5:], expected, atol=1e-6)
    # the distillation pass at this model's own positions is its own prediction
    again = d(x, mf, inputs=SelectionInputs(distill_positions=plain["topk"]))
    assert torch.allclose(again["distill"]["pred_logits"], plain["pred_logits"], atol=1e-6)


def ref_bitmask_boxes(masks):
    """detectron2 ``BitMasks.get_bounding_boxes``."""
    boxes = torch.zeros(masks.shape[0], 4, dtype=torch.float32)
    x_any, y_any = torch.any(masks, dim=1), torch.any(masks, dim=2)
    for i in range(masks.shape[0]):
        x = torch.where(x_any[i, :])[0]
        y = torch.where(y_any[i, :])[0]
        if len(x) > 0 and len(y) > 0:
            boxes[i, :] = torch.as_tensor([x[0], y[0], x[-1] + 1, y[-1] + 1], dtype=torch.float32)
    return boxes


def test_mask_boxes_and_giou():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(6, 9, 13, generator=g) > 0.8
    masks[2] = False
    assert torch.equal(sl.mask_boxes(masks), ref_bitmask_boxes(masks))
    box = sl.target_boxes(
        torch.zeros(1, 4, 8, dtype=torch.bool).index_fill_(1, torch.tensor([1]), True)
    )
    assert torch.allclose(box, torch.tensor([[0.5, 0.375, 1.0, 0.25]]))  # row 1 of a 4x8 image
    a, b = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    expected = 1 / (7 + 1e-6) - (9 - 7) / (9 + 1e-6)
    assert sl.generalized_box_iou(a, b).item() == pytest.approx(expected)


def _outputs(q=6, c=5, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": torch.randn(b, q, c, generator=g),
        "pred_masks": torch.randn(b, q, 8, 8, generator=g),
        "pred_boxes": torch.rand(b, q, 4, generator=g) * 0.5 + 0.1,
    }


def _targets(seed=0, n=(2, 3)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for count in n:
        masks = torch.rand(count, 8, 8, generator=g) > 0.6
        labels = torch.randperm(5, generator=g)[:count]
        out.append({"labels": labels, "masks": masks, "boxes": sl.target_boxes(masks)})
    return out


def ref_match(outputs, targets, num_points):
    """``memory_efficient_forward`` (matcher.py:95-175), every class a thing."""
    from scipy.optimize import linear_sum_assignment

    from incseg.query_losses import batch_dice_cost, batch_sigmoid_ce_cost

    indices = []
    for b in range(outputs["pred_logits"].shape[0]):
        tgt_bbox, out_bbox = targets[b]["boxes"], outputs["pred_boxes"][b]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -sl.generalized_box_iou(
            sl.box_cxcywh_to_xyxy(out_bbox), sl.box_cxcywh_to_xyxy(tgt_bbox)
        )
        cost_giou[cost_giou.isnan()] = 0.0
        cost_bbox[cost_bbox.isnan()] = 0.0
        prob = outputs["pred_logits"][b].sigmoid()
        ids = targets[b]["labels"]
        neg = (1 - 0.25) * (prob**2) * (-(1 - prob + 1e-8).log())
        pos_ = 0.25 * ((1 - prob) ** 2) * (-(prob + 1e-8).log())
        cost_class = pos_[:, ids] - neg[:, ids]
        out_mask = outputs["pred_masks"][b][:, None]
        tgt_mask = targets[b]["masks"].float()[:, None]
        coords = torch.rand(1, num_points, 2)
        tgt_mask = point_sample(tgt_mask, coords.repeat(tgt_mask.shape[0], 1, 1)).squeeze(1)
        out_mask = point_sample(out_mask, coords.repeat(out_mask.shape[0], 1, 1)).squeeze(1)
        c = (
            5 * batch_sigmoid_ce_cost(out_mask, tgt_mask)
            + 2 * cost_class
            + 5 * batch_dice_cost(out_mask, tgt_mask)
            + 5 * cost_bbox
            + 2 * cost_giou
        )
        indices.append(linear_sum_assignment(c.reshape(prob.shape[0], -1).numpy()))
    return [(torch.as_tensor(i), torch.as_tensor(j)) for i, j in indices]


def test_matcher_equals_the_official_with_box_costs():
    outputs, targets = _outputs(), _targets()
    weights = sl.SimCISWeights(set=CriterionWeights(num_points=50))
    torch.manual_seed(5)
    mine = sl.simcis_match(outputs, targets, weights)
    torch.manual_seed(5)
    ref = ref_match(outputs, targets, 50)
    for (a, b), (c, d) in zip(mine, ref, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


def ref_focal_labels(src_logits, targets, indices, num_boxes, fake_labels, num_queries):
    """``loss_labels`` with ``_modify_indices_targets_for_fake_query`` (criterion.py)."""
    import copy

    vq = fake_labels.shape[1] if fake_labels is not None else 0
    if fake_labels is not None:
        new_indices, targets = [], copy.deepcopy(targets)
        for src, tgt in indices:
            top = max(tgt).long() if len(tgt) > 0 else torch.tensor(-1).long()
            new_indices.append(
                (
                    torch.cat((src, torch.arange(num_queries, num_queries + vq))),
                    torch.cat((tgt, torch.tensor([top + i + 1 for i in range(vq)]))),
                )
            )
        for t, f in zip(targets, fake_labels, strict=True):
            t["labels"] = torch.cat((t["labels"], f))
        indices = new_indices
    batch_idx = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)])
    src_idx = torch.cat([s for s, _ in indices])
    target_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices, strict=True)])
    classes = torch.full(src_logits.shape[:2], src_logits.shape[2], dtype=torch.int64)
    classes[batch_idx, src_idx] = target_o
    onehot = torch.zeros([*src_logits.shape[:2], src_logits.shape[2] + 1])
    onehot.scatter_(2, classes.unsqueeze(-1), 1)
    onehot = onehot[:, :, :-1]
    prob = src_logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(src_logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    loss = ce * ((1 - p_t) ** 2)
    loss = (0.25 * onehot + 0.75 * (1 - onehot)) * loss
    return loss.mean(1).sum() / num_boxes * src_logits.shape[1]


def test_focal_class_loss_with_virtual_queries_equals_the_official_values_and_gradients():
    outputs, targets = _outputs(q=8), _targets()
    indices = [
        (torch.tensor([0, 4]), torch.tensor([1, 0])),
        (torch.tensor([1, 2, 5]), torch.tensor([2, 0, 1])),
    ]
    fake = torch.tensor([[3, 1], [0, 0]])
    mine_in = outputs["pred_logits"].clone().requires_grad_()
    ref_in = outputs["pred_logits"].clone().requires_grad_()
    mine = sl.focal_labels_loss(mine_in, targets, indices, 5.0, fake)
    ref = ref_focal_labels(ref_in, targets, indices, 5.0, fake, num_queries=6)
    mine.backward()
    ref.backward()
    assert torch.allclose(mine, ref) and torch.allclose(mine_in.grad, ref_in.grad)
    plain = sl.focal_labels_loss(outputs["pred_logits"], targets, indices, 5.0, None)
    expected = ref_focal_labels(outputs["pred_logits"], targets, indices, 5.0, None, 8)
    assert torch.allclose(plain, expected)


def test_kl_term_is_batchmean_kl_of_old_to_new_at_t():
    new, old = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    expected = F.softmax(old / 2, -1) * (F.log_softmax(old / 2, -1) - F.log_softmax(new / 2, -1))
    assert sl.kl_distillation(new, old, 2.0).item() == pytest.approx(expected.sum().item() / 2)
    part = sl.kl_distillation(new, old, 1.0, old_classes=3)
    assert part.item() == pytest.approx(sl.kl_distillation(new[..., :3], old[..., :3], 1.0).item())


def ref_pseudo(old_masks, old_labels, old_scores, gt_masks, overlap=0.8):
    """``generate_psd_targets`` with ``strict_mode False`` and ``combine_psdlabel True``."""
    old_area = (old_masks >= 0.5).sum(dim=(1, 2))
    mask_ids = (old_scores.view(-1, 1, 1) * old_masks).argmax(0)
    non_ol = torch.zeros_like(old_masks).to(torch.bool)
    for k in range(old_labels.shape[0]):
        non_ol[k] = (mask_ids == k) & (old_masks[k] >= 0.5)
    gt_region = torch.clamp(gt_masks.sum(0).int(), min=0, max=1)
    non_ol = torch.logical_and(non_ol, torch.logical_not(gt_region))
    new_area = non_ol.sum(dim=(1, 2))
    keep = (new_area > 0) & (new_area > old_area * overlap)
    labels, select = old_labels[keep], non_ol[keep]
    unique = labels.unique()
    masks = [select[labels == c].sum(dim=0).clamp(min=0, max=1) for c in unique]
    return unique, torch.stack(masks).bool() if masks else select


def test_pseudo_targets_equal_the_officials_joined_per_class():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 6, generator=g) * 3
    logits[:] = -5.0
    logits[torch.arange(4), torch.tensor([1, 1, 2, 3])] = 4.0  # two queries of class 1
    logits[5, 0] = 1.0
    masks = torch.randn(12, 16, 16, generator=g) - 4  # mostly off
    for k, (r, c) in enumerate([(0, 0), (8, 8), (0, 8), (8, 0)]):
        masks[k, r : r + 8, c : c + 8] += 10  # four quadrants
    masks[5, 2:10, 2:10] += 10  # another query across them, lower score
    gt = torch.zeros(1, 16, 16, dtype=torch.bool)
    gt[0, 8:, :8] = True  # the ground truth covers query 3's quadrant
    labels, probs, scores = sl.old_predictions(logits, masks, old_count=4)
    assert not (labels == 4).any() and torch.all(scores[:-1] >= scores[1:])
    mine = sl.pseudo_targets(labels, probs, scores, gt)
    ref_labels, ref_masks = ref_pseudo(probs, labels, scores, gt)
    assert torch.equal(mine["labels"], ref_labels) and torch.equal(mine["masks"], ref_masks)
    # class 1 joins two quadrants; class 3's is under the ground truth; query 5 owns no pixel
    assert mine["labels"].tolist() == [1, 2] and mine["masks"][0].sum() == 128
    assert not (mine["masks"] & gt[0]).any()


def ref_inference(mask_cls, mask_pred, seen, overlap=0.8):
    """``semantic_inference`` (maskformer_model.py:551-591), returning the label map."""
    mask_cls = mask_cls.sigmoid()
    scores, labels = mask_cls.max(-1)
    keep = labels.ne(seen) & (scores >= 0.4)
    mask_pred = mask_pred.sigmoid()
    scores, labels = F.softmax(mask_cls / 0.06, dim=-1).max(-1)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], mask_pred[keep]
    semseg = torch.ones(mask_pred.shape[-2:], dtype=torch.long) * mask_cls.shape[-1]
    if cur_masks.shape[0] == 0:
        return semseg
    ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    for k in range(cur_classes.shape[0]):
        area = (ids == k).sum().item()
        original = (cur_masks[k] >= 0.5).sum().item()
        mask = (ids == k) & (cur_masks[k] >= 0.5)
        if area > 0 and original > 0 and mask.sum().item() > 0:
            if area / original < overlap or original / area < overlap:
                continue
            semseg[mask] = cur_classes[k].item()
    return semseg


def test_inference_equals_the_officials():
    g = torch.Generator().manual_seed(4)
    logits = torch.full((2, 6, 6), -5.0)
    logits[:, torch.arange(4), torch.tensor([0, 1, 4, 2])] = 3.0  # class 4 == seen: dropped
    logits[1] += torch.randn(6, 6, generator=g)
    masks = torch.randn(2, 6, 12, 12, generator=g) - 5
    masks[:, 0, :6, :6] += 10  # query 0 paints the top-left quadrant
    masks[:, 1, 6:, 6:] += 10  # query 1 the bottom-right one
    masks[:, 2, :6, 6:] += 10  # query 2's class is not kept
    masks[:, 3, :4, :12] += 10  # query 3 overlaps 0 and 2: the area rule decides
    mine = sl.simcis_inference(logits, masks, seen=4)
    for b in range(2):
        assert torch.equal(mine[b], ref_inference(logits[b], masks[b], seen=4))
    assert (mine == 6).any() and (mine < 6).any()  # void pixels and painted ones


def test_sampling_weights_by_hand():
    weights = sl.sampling_weights(torch.tensor([0, 3, 1]), alpha=0.5)  # counts + 1 sum to 7
    assert torch.allclose(weights, torch.tensor([7 / 1, 7 / 4, 7 / 2], dtype=torch.float64) ** 0.5)


def test_the_bank_keeps_the_last_features_per_class_and_virtual_queries_draw_stored_classes():
    from incseg.methods.simcis import SimCIS
    from incseg.protocol import get_setting, step_info

    method = SimCIS(bank_size=3, virtual_queries=2, num_points=16)
    out = _outputs(q=4, c=5, b=1)
    out["selected"] = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 3)
    target = [{"labels": torch.tensor([2]), "masks": torch.ones(1, 8, 8, dtype=torch.bool)}]
    target[0]["boxes"] = sl.target_boxes(target[0]["masks"])
    for _ in range(5):
        method._store(out, target)
    assert list(method.bank) == [2] and method.bank[2].shape == (3, 3)
    info = step_info(get_setting("voc", "15-5"), 1)
    method.counts = torch.zeros(16, dtype=torch.int64)
    torch.manual_seed(0)
    virtual, labels = method._virtual(3, info, torch.device("cpu"))
    assert virtual.shape == (3, 2, 3) and (labels == 2).all()  # the only stored class
    state = method.state_dict()
    again = SimCIS()
    again.load_state_dict(state)
    assert torch.equal(again.bank[2], method.bank[2])
    assert method._virtual(3, step_info(get_setting("voc", "15-5"), 0), torch.device("cpu")) == (
        None,
        None,
    )


def test_a_model_that_abstains_leaves_those_pixels_out_of_the_evaluation():
    from incseg.engine.evaluate import evaluate
    from incseg.engine.runtime import Runtime

    class Abstains(torch.nn.Module):
        inference = "simcis"

        def forward(self, images):
            return images

        def prediction_scores(self, output):
            scores = torch.zeros(output.shape[0], 3, *output.shape[-2:])
            scores[:, 1, :, :2] = 1  # class 1 on the left half
            scores[:, 2, :, 2:] = 1  # "no prediction" on the right half
            return scores

    targets = torch.ones(1, 4, 4, dtype=torch.long)  # all class 1
    rt = Runtime.of(load_config("demo"))
    targets[:, 0] = 0  # but the top row is background
    matrix = evaluate(Abstains(), [(torch.zeros(1, 3, 4, 4), targets)], 2, rt)
    # the right half counts nowhere in the IoU; the last column says how much of each class
    assert matrix.tolist() == [[0, 2, 2], [0, 6, 6]]
    info = SimpleNamespace(step=0, class_names=("background", "a"), num_base_channels=2)
    report = StepReport.from_confusion(matrix, info)
    assert report.abstained == 0.5 and report.to_dict()["abstained"] == 0.5
    assert report.iou == (0.0, 0.75)  # class 1: 6 of its 8 predicted pixels right
    assert "no prediction on 50.00% of the labelled pixels" in format_step_table(report, "t")
    plain = StepReport.from_confusion(matrix[:, :2], info)
    assert plain.abstained is None and "abstained" not in plain.to_dict()


def test_config_pairs_simcis_with_its_model_only(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {architecture: mask2former, mask2former: {background: false}}\n"
        "method: {name: simcis}\n"
    )
    with pytest.raises(ConfigError, match="method 'simcis' trains SimCIS's model: set decoder"):
        load_config(path)
    path.write_text(
        "model: {architecture: mask2former, mask2former: {decoder: selection}}\n"
        "method: {name: m2f_ft}\n"
    )
    with pytest.raises(ConfigError, match="trained by method 'simcis' only"):
        load_config(path)
    with pytest.raises(ConfigError, match="frozen_bn .* is for the ResNet backbones"):
        load_config("demo", ["model.norm=frozen_bn"])
    config = load_config("ade/100-5-simcis")
    assert config.method.params["virtual_queries"] == 3 and config.train.lr_decay_at == (0.85, 0.95)
    assert load_config("ade/100-50-simcis").method.params["kd_decoder"] is False


SIMCIS_SETS = [
    s.replace("method.name=m2f_ft", "method.name=simcis").replace(
        "enc_dim_feedforward: 16}",
        "enc_dim_feedforward: 16, background: false, "
        "decoder: selection, class_head: static, inference: simcis}",
    )
    for s in M2F_SETS
]


def test_a_tiny_simcis_run_distils_replays_and_resumes_exactly(tiny_config_path, tmp_path):
    out = tmp_path / "ref"
    args = run_method(tiny_config_path, out, *SIMCIS_SETS)
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert "kl" in steps[1]["losses"][0] and "kl" not in steps[0]["losses"][0]
    assert {"bbox", "giou"} <= steps[0]["losses"][0].keys()
    state = torch.load(out / "step_1.pt", weights_only=True)["method"]
    assert state["bank"] and state["counts"].sum() > 0  # filled; the collection pass counted
    check_exact_resume(out, args, tmp_path / "mid-step")
    check_exact_resume(out, args, tmp_path / "collection", kill_at="scan:1:1")
