"""BalConpas (``balconpas``) against literal re-statements of jinpeng0528/BalConpas 3b76142: the
old model's pseudo targets (``maskformer_model.py:266-279, 329-380``), the class loss with
replayed images and the criterion with the past-class backtrace distillation
(``mask2former/modeling/criterion.py:127-164, 238-317``), values and gradients; hand cases; the
method's total; a tiny run through the command line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers.method_runs import run_method
from test_query_losses import (
    RefHungarianMatcher,
    RefSetCriterion,
    clone_outputs,
    leaves,
    random_outputs,
    random_targets,
)
from test_query_model import M2F_SETS, model

from incseg import balconpas_losses as bl
from incseg.query_losses import CriterionWeights


def ref_old_predictions(mask_cls_result, mask_pred_result):
    """``maskformer_model.py:269-277`` (``psd_label=True``), restated for one image."""
    scores, labels = F.softmax(mask_cls_result, dim=-1).max(-1)
    n_cls = mask_cls_result.shape[-1] - 1
    keep = labels.ne(n_cls)
    sort = scores[keep].argsort(descending=True, stable=True)
    return {
        "labels": labels[keep][sort],
        "masks": mask_pred_result[keep][sort].sigmoid(),
        "scores": scores[keep][sort],
    }


def ref_generate_psd_targets(gt_targets, old_preds, memory_part, overlap_threshold=0.8):
    """``maskformer_model.py:337-380``, restated (``memory_part`` given)."""
    psd_targets, old_targets = [], []
    for i, (gt_target, old_pred) in enumerate(zip(gt_targets, old_preds)):
        psd_target, old_target = {}, {}
        old_masks, old_labels, old_scores = (
            old_pred["masks"],
            old_pred["labels"],
            old_pred["scores"],
        )
        if old_masks.shape[0] == 0:
            psd_target["labels"] = old_labels
            psd_target["masks"] = old_masks >= 0.5
            psd_targets.append(psd_target)
            old_targets.append({"labels": old_labels, "masks": old_masks >= 0.5})
            continue
        old_area = (old_masks >= 0.5).sum(dim=(1, 2))
        prob_masks = old_scores.view(-1, 1, 1) * old_masks
        mask_ids = prob_masks.argmax(0)
        non_ol_masks = torch.zeros_like(old_masks).to(torch.bool)
        for k in range(old_labels.shape[0]):
            non_ol_masks[k] = (mask_ids == k) & (old_masks[k] >= 0.5)
        if not memory_part[i]:
            gt_region = torch.clamp(gt_target["masks"].sum(0).int(), min=0, max=1)
            non_ol_masks = torch.logical_and(non_ol_masks, torch.logical_not(gt_region))
        new_area = non_ol_masks.sum(dim=(1, 2))
        keep = (new_area > 0) & (new_area > old_area * overlap_threshold)
        psd_target["labels"] = old_labels[keep]
        psd_target["masks"] = non_ol_masks[keep]
        psd_targets.append(psd_target)
        old_target["labels"] = old_labels[keep]
        old_target["masks"] = old_masks[keep]
        old_targets.append(old_target)
    return psd_targets, old_targets


class RefBalConpasCriterion(RefSetCriterion):
    """``criterion.py:113-118, 127-164, 238-317``, restated on one process."""

    def __init__(self, *args, current_catagory_ids, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory_empty_weight = self.empty_weight.clone()
        self.memory_empty_weight[-1] = 0.0
        self.current_catagory_ids = torch.tensor(current_catagory_ids)

    def loss_labels(self, outputs, targets, indices, num_masks, memory_part=None):
        src_logits = outputs["pred_logits"].float()
        idx = self._get_src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64)
        target_classes[idx] = target_classes_o
        if memory_part is not None and sum(memory_part) > 0:
            non_memory_part = [not m for m in memory_part]
            loss_ce_memory = F.cross_entropy(
                src_logits[memory_part].transpose(1, 2),
                target_classes[memory_part],
                self.memory_empty_weight,
                reduction="none",
            )
            num_bg_mem = sum(memory_part) * src_logits.size(1) - sum(
                [len(index[0]) for i, index in enumerate(indices) if memory_part[i]]
            )
            num_bg_curr = sum(non_memory_part) * src_logits.size(1) - sum(
                [len(index[0]) for i, index in enumerate(indices) if non_memory_part[i]]
            )
            empty_weight = self.empty_weight.clone()
            if num_bg_curr > 0:
                empty_weight[-1] *= (num_bg_mem + num_bg_curr) / num_bg_curr
            loss_ce = F.cross_entropy(
                src_logits[non_memory_part].transpose(1, 2),
                target_classes[non_memory_part],
                empty_weight,
                reduction="none",
            )
            weights_for_empty_weight = (
                src_logits.size(0) * src_logits.size(1) * 0.1
                + sum([len(index[0]) for i, index in enumerate(indices)]) * 0.9
            )
            loss_ce = (loss_ce_memory.sum() + loss_ce.sum()) / weights_for_empty_weight
        else:
            loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss_ce}

    def get_loss(self, loss, outputs, targets, indices, num_masks, memory_part=None):
        if loss == "labels":
            return self.loss_labels(outputs, targets, indices, num_masks, memory_part)
        return self.loss_masks(outputs, targets, indices, num_masks)

    def __call__(
        self, outputs, targets, psd_targets=None, old_targets=None, med=None, old_med=None
    ):
        outputs_without_aux = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        memory_part = [
            bool(torch.logical_not(torch.isin(t["labels"], self.current_catagory_ids)).sum() != 0)
            for t in targets
        ]
        if psd_targets is None or old_targets is None:
            complete = targets
        else:
            complete = []
            for i, (p, t) in enumerate(zip(psd_targets, targets)):
                if memory_part[i]:
                    complete.append({"labels": t["labels"], "masks": t["masks"]})
                else:
                    complete.append(
                        {
                            "labels": torch.cat([p["labels"], t["labels"]]),
                            "masks": torch.cat([p["masks"], t["masks"]]),
                        }
                    )
        indices = self.matcher(outputs_without_aux, complete)
        if old_targets is not None:
            old_target_num = [len(t["labels"]) for t in old_targets]
            indices_to_old = [q[t < old_target_num[i]] for i, (q, t) in enumerate(indices)]
            med_to_old, old_med_to_old = [], []
            for per_med, per_old in zip(med, old_med):  # (Q, B, C) each
                a = [per_med[:, i][indices_to_old[i]] for i in range(per_med.shape[1])]
                b = [per_old[:, i][indices_to_old[i]] for i in range(per_med.shape[1])]
                med_to_old.append(torch.cat(a, dim=0))
                old_med_to_old.append(torch.cat(b, dim=0))
        num_masks = max(float(sum(len(t["labels"]) for t in complete)), 1.0)
        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, complete, indices, num_masks, memory_part))
        if med is not None:
            losses["loss_med_tokens"] = F.mse_loss(med_to_old[-1], old_med_to_old[-1])
        for i, aux in enumerate(outputs["aux_outputs"]):
            indices = self.matcher(aux, complete)
            for loss in self.losses:
                l_dict = self.get_loss(loss, aux, complete, indices, num_masks, memory_part)
                losses.update({k + f"_{i}": v for k, v in l_dict.items()})
            if med is not None:
                losses[f"loss_med_tokens_{i}"] = F.mse_loss(med_to_old[i], old_med_to_old[i])
        return losses


def old_model_outputs(gen, batch, queries, num_old, size):
    """Class logits (a third of the queries say no-object) and smooth mask logits, so that
    queries own regions and some pseudo targets survive the overlap rule."""
    logits = 2 * torch.randn(batch, queries, num_old + 1, generator=gen)
    logits[:, : queries // 3, -1] += 6
    coarse = torch.randn(batch, queries, 9, generator=gen) - 6  # each query: one of 9 cells
    cells = torch.stack([torch.randperm(9, generator=gen)[:queries] % 9 for _ in range(batch)])
    coarse.scatter_(2, cells[..., None], 6.0)
    coarse = coarse.view(batch, queries, 3, 3)
    return logits, F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def blocky_targets(gen, counts, num_classes, size):
    """Ground truth made of blocks (a 2 x 2 grid of cells, each in or out)."""
    targets = random_targets(gen, counts, num_classes, (2, 2))
    for t in targets:
        grown = t["masks"].repeat_interleave(size[0] // 2, 1).repeat_interleave(size[1] // 2, 2)
        t["masks"] = F.pad(grown, (0, size[1] % 2, 0, size[0] % 2))
    return targets


def test_pseudo_targets_match_the_official(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    logits, masks = old_model_outputs(gen, 4, 9, 6, (24, 20))
    gts = blocky_targets(gen, [1, 1, 0, 2], 6, (24, 20))
    memory = [False, True, False, False]
    old_preds = [ref_old_predictions(logits[b], masks[b]) for b in range(4)]
    ref, _ = ref_generate_psd_targets(gts, old_preds, memory)
    found = 0
    for b in range(4):
        mine = bl.pseudo_targets(logits[b], masks[b], gts[b]["masks"], memory[b])
        assert torch.equal(mine["labels"], ref[b]["labels"])
        assert torch.equal(mine["masks"], ref[b]["masks"]) and mine["masks"].dtype == torch.bool
        found += len(mine["labels"])
    assert found > 2  # the case tests something
    empty = bl.pseudo_targets(
        torch.zeros(3, 4).index_fill_(1, torch.tensor([3]), 9), masks[0, :3], gts[0]["masks"]
    )
    assert empty["labels"].numel() == 0 and empty["masks"].shape == (0, 24, 20)


def test_pseudo_targets_by_hand():
    # query 0: class 1 (p ~ 0.99), left half; query 1: class 0, the whole image but less sure;
    # the ground truth covers the top row. Query 1 keeps the right half minus the top row: 3 of
    # its 8 confident pixels, under 0.8 of them: dropped. Query 0 keeps 3 of its 4: 0.75 < 0.8,
    # dropped too unless the threshold is lower.
    logits = torch.tensor([[0.0, 9.0, 0.0], [5.0, 0.0, 0.0]])
    masks = torch.full((2, 4, 2), 5.0)
    masks[0, :, 1] = -5.0
    gt = torch.zeros(1, 4, 2, dtype=torch.bool)
    gt[0, 0] = True
    assert bl.pseudo_targets(logits, masks, gt)["labels"].tolist() == []
    kept = bl.pseudo_targets(logits, masks, gt, overlap=0.5)
    assert kept["labels"].tolist() == [1]  # query 1: 3 / 8 < 0.5
    assert kept["masks"][0].tolist() == [
        [False, False],
        [True, False],
        [True, False],
        [True, False],
    ]
    replayed = bl.pseudo_targets(logits, masks, gt, replayed=True)  # the top row is eligible
    assert replayed["labels"].tolist() == [1]


def make_criterion(num_classes, current, num_points=64):
    matcher = RefHungarianMatcher(
        cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points
    )
    return RefBalConpasCriterion(
        num_classes,
        matcher=matcher,
        weight_dict={},
        eos_coef=0.1,
        losses=["labels", "masks"],
        num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        current_catagory_ids=current,
    )


def test_the_class_loss_with_replayed_images_matches_the_official():
    gen = torch.Generator().manual_seed(1)
    outputs = random_outputs(gen, 3, 7, 8, (16, 16), 0)
    targets = random_targets(gen, [2, 3, 1], 8, (16, 16))
    targets[1]["labels"] = torch.tensor([0, 6, 7])  # class 0 is an old one: image 1 is replayed
    for t in targets[::2]:
        t["labels"] = t["labels"] % 3 + 5  # current classes 5..7
    indices = [(torch.arange(len(t["labels"])), torch.arange(len(t["labels"]))) for t in targets]
    criterion = make_criterion(8, [5, 6, 7])
    memory = [False, True, False]
    ref_out, our_out = clone_outputs(outputs), clone_outputs(outputs)
    ref = criterion.loss_labels(ref_out, targets, indices, 1.0, memory)["loss_ce"]
    mine = bl.memory_labels_loss(our_out["pred_logits"], targets, indices, 8, 0.1, memory)
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
    ref.backward()
    mine.backward()
    torch.testing.assert_close(our_out["pred_logits"].grad, ref_out["pred_logits"].grad)
    # without a replayed image it is Mask2Former's weighted mean
    plain = criterion.loss_labels(outputs, targets, indices, 1.0, [False] * 3)["loss_ce"]
    torch.testing.assert_close(
        bl.memory_labels_loss(outputs["pred_logits"], targets, indices, 8, 0.1, [False] * 3), plain
    )
    assert not torch.allclose(mine, plain)


def test_the_criterion_with_distillation_matches_the_official():
    gen = torch.Generator().manual_seed(2)
    batch, queries, size, num_aux, num_classes = 3, 8, (20, 20), 3, 9
    outputs = random_outputs(gen, batch, queries, num_classes, size, num_aux)
    gts = blocky_targets(gen, [1, 2, 1], num_classes, size)
    for t in gts:
        t["labels"] = t["labels"] % 3 + 6  # current classes 6..8
    gts[2]["labels"] = torch.tensor([1])  # replayed: an old class
    logits, masks = old_model_outputs(gen, batch, queries, 6, size)
    old_preds = [ref_old_predictions(logits[b], masks[b]) for b in range(batch)]
    memory = [False, False, True]
    psd, old_targets = ref_generate_psd_targets(gts, old_preds, memory)
    assert sum(len(p["labels"]) for p in psd) >= 2
    states = [torch.randn(queries, batch, 16, generator=gen) for _ in range(num_aux + 1)]
    old_states = [torch.randn(queries, batch, 16, generator=gen) for _ in range(num_aux + 1)]
    ref_states = [s.clone().requires_grad_(True) for s in states]
    our_states = [s.transpose(0, 1).clone().requires_grad_(True) for s in states]
    ref_out, our_out = clone_outputs(outputs), clone_outputs(outputs)
    torch.manual_seed(7)
    ref = make_criterion(num_classes, [6, 7, 8])(
        ref_out, gts, psd, old_targets, ref_states, old_states
    )
    joined = [
        t
        if m
        else {
            "labels": torch.cat([p["labels"], t["labels"]]),
            "masks": torch.cat([p["masks"], t["masks"]]),
        }
        for p, t, m in zip(psd, gts, memory)
    ]
    weights = CriterionWeights(num_points=64)
    distill = (
        our_states,
        [s.transpose(0, 1) for s in old_states],
        [len(t["labels"]) for t in old_targets],
    )
    torch.manual_seed(7)
    mine = bl.balconpas_criterion(our_out, joined, num_classes, weights, memory, distill)
    assert sorted(mine) == sorted(ref) and "loss_med_tokens_2" in mine
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], rtol=0, atol=1e-6, msg=key)
    sum(ref.values()).backward()
    sum(mine.values()).backward()
    for a, b in zip(leaves(our_out), leaves(ref_out), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)
    for a, b in zip(our_states, ref_states, strict=True):
        torch.testing.assert_close(a.grad, b.grad.transpose(0, 1), rtol=0, atol=1e-6)


def test_no_query_matched_to_a_pseudo_target_gives_zero_not_nan():
    states = [torch.randn(2, 4, 8, requires_grad=True)]
    indices = [(torch.tensor([0, 1]), torch.tensor([0, 1]))] * 2
    picked = bl._to_old(states[0], indices, [0, 0])
    loss = bl._states_mse(picked, picked.detach())
    assert picked.shape == (0, 8) and loss.item() == 0.0
    loss.backward()


def test_the_method_is_the_weighted_criterion_on_its_targets_at_step_1():
    from incseg.methods.balconpas import BalConpas
    from incseg.methods.query import targets_of
    from incseg.protocol import get_setting, step_info

    info = step_info(get_setting("voc", "15-5"), 1)
    net = model((16, 5), background=False)
    old_net = model((16,), background=False)
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 21, (2, 64, 64))
    labels[0] = labels[0] % 6 + 15  # image 0: background and new classes; image 1 also old ones
    labels[0][labels[0] == 15] = 0
    with torch.no_grad():
        old = old_net(images, features=("queries",))
    method = BalConpas(num_points=64)
    torch.manual_seed(3)
    output = net(images, features=("queries",))
    terms = method.losses(output, old, labels, info)
    assert set(terms) == {"ce", "mask", "dice", "med"} and len(output.queries) == 3
    # the same through the pieces: image 1 is replayed (old classes), so only image 0 gets
    # pseudo targets, first
    found = targets_of(labels, 1)
    old_masks = F.interpolate(old.pred_masks, size=(64, 64), mode="bilinear", align_corners=False)
    pseudo = [
        bl.pseudo_targets(old.pred_logits[b], old_masks[b], found[b]["masks"], b == 1)
        for b in range(2)
    ]
    joined = [
        {"labels": torch.cat([pseudo[0]["labels"], found[0]["labels"]]),
         "masks": torch.cat([pseudo[0]["masks"], found[0]["masks"]])},
        found[1],
    ]  # fmt: skip
    torch.manual_seed(3)
    output = net(images, features=("queries",))
    distill = (output.queries, old.queries, [len(p["labels"]) for p in pseudo])
    raw = bl.balconpas_criterion(
        output.as_dict(), joined, 20, CriterionWeights(num_points=64), [False, True], distill
    )
    factor = {"ce": 2.0, "mask": 5.0, "dice": 5.0, "med": 5.0}
    expected = sum(factor[k.removeprefix("loss_").split("_")[0]] * v for k, v in raw.items())
    torch.testing.assert_close(sum(terms.values()), expected, rtol=1e-5, atol=1e-6)
    assert len(raw) == 4 * 3  # ce, mask, dice, med at each of the 3 predictions


def test_balconpas_shares_step_0_with_m2f_ft(tmp_path):
    from incseg.config import load_config
    from incseg.engine.adopt import shared_steps_key

    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {architecture: mask2former, mask2former: {background: false}}\n"
        "method: {name: balconpas}\n"
    )
    ours = load_config(path, ["method.med_tokens_weight=2"])
    ft = load_config(path, ["method.name=m2f_ft"])
    assert shared_steps_key(ours, 0) == shared_steps_key(ft, 0)
    assert shared_steps_key(ours, 1) != shared_steps_key(ft, 1)


def test_a_tiny_balconpas_run_reports_the_distillation_after_step_0(tiny_config_path, tmp_path):
    out = tmp_path / "run"
    sets = [s.replace("method.name=m2f_ft", "method.name=balconpas") for s in M2F_SETS]
    run_method(tiny_config_path, out, *sets, "model.mask2former.background=false")
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert len(steps) == 2 and "med" in steps[1]["losses"][0] and "med" not in steps[0]["losses"][0]


def test_a_background_class_is_refused_for_the_pseudo_labelling_methods(tmp_path):
    from incseg.config import load_config
    from incseg.errors import ConfigError

    path = tmp_path / "c.yaml"
    for name in ("balconpas", "comformer", "m2f_plop"):
        path.write_text(f"model: {{architecture: mask2former}}\nmethod: {{name: {name}}}\n")
        with pytest.raises(ConfigError, match="background: true; method .* set it false"):
            load_config(path, ["data.crop_size=128"])
    path.write_text("model: {architecture: mask2former}\nmethod: {name: m2f_ft}\n")
    assert load_config(path).model.mask2former.background  # FT has no pseudo-labels


def ref_greedy_selection(images_data, num_categories, num_selections, target, current=None):
    """``memory_selection_sem.py:60-85``, restated."""
    import numpy as np

    selected_images = []
    if current is None:
        current = np.zeros(num_categories)
    for _ in range(num_selections):
        best_img, best_score = None, float("inf")
        for img, segment_num in images_data.items():
            if img in selected_images:
                continue
            new = current + np.array(segment_num)
            ratio = new / np.sum(new)
            diff = np.sum(np.abs(ratio - target))
            if diff < best_score:
                best_score, best_img = diff, img
        selected_images.append(best_img)
        current = current + np.array(images_data[best_img])
    return selected_images, current


def test_greedy_selection_matches_the_official_and_a_hand_table():
    import numpy as np

    from incseg.protocol.memory import greedy_by_frequency

    # hand table: target 3:1 between classes 0 and 1; images hold {0}, {1}, {0, 1}, {0}
    vectors = np.array([[1, 0], [0, 1], [1, 1], [1, 0]], dtype=float)
    target = np.array([0.75, 0.25])
    taken, counts = greedy_by_frequency(vectors, target, 3, np.zeros(2))
    # first: {0} (1, 0) -> |1-.75|+|0-.25| = 0.5, {0,1} -> 0.5, {1} -> 1.5: the first of the tie
    # then with (1, 0): +{1} -> (.5,.5): 0.5; +{0,1} -> (2/3, 1/3): 1/6; +{0} -> 0.5: image 2
    # then with (2, 1): +{1} -> (.5,.5) 0.5; +{0} -> (.75,.25) 0: image 3
    assert taken == [0, 2, 3] and counts.tolist() == [3.0, 1.0]
    rng = np.random.default_rng(0)
    for _ in range(5):
        vectors = (rng.random((40, 12)) < 0.2).astype(float)
        target = rng.random(12)
        target /= target.sum()
        start = (rng.random(12) < 0.5).astype(float)
        data = {f"img{i}": list(v) for i, v in enumerate(vectors)}
        with np.errstate(invalid="ignore"):
            ref, ref_counts = ref_greedy_selection(data, 12, 15, target, start.copy())
        mine, counts = greedy_by_frequency(vectors, target, 15, start)
        assert [f"img{i}" for i in mine] == ref and np.array_equal(counts, ref_counts)


def test_the_frequency_memory_keeps_a_share_of_the_previous_one():
    import numpy as np

    from incseg.protocol.memory import Exemplar, select_by_frequency

    previous = [Exemplar(i, f"p{i}", 0, (1,) if i % 2 else (2,)) for i in range(6)]
    candidates = [Exemplar(10 + i, f"c{i}", 1, (3,)) for i in range(6)]
    candidates.append(Exemplar(0, "p0", 1, (3,)))  # also in the previous memory: not fresh
    counts = np.zeros(256)
    counts[[1, 2, 3]] = [10, 10, 5]
    chosen = select_by_frequency(previous, candidates, counts, keep=4, size=6)
    assert [e.index for e in chosen[:4]] == [0, 1, 2, 3]  # 2:2 of classes 1 and 2, as 10:10
    assert all(e.index >= 10 for e in chosen[4:]) and all(e.chosen_for == 0 for e in chosen)


@pytest.fixture(scope="module")
def replay_run(tiny_config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("balconpas-r") / "run"
    sets = [s.replace("method.name=m2f_ft", "method.name=balconpas") for s in M2F_SETS]
    sets += ["model.mask2former.background=false", "method.memory_size=6"]
    return out, run_method(tiny_config_path, out, *sets)


def test_a_tiny_replay_run_keeps_its_memory_and_resumes_exactly(replay_run, tmp_path):
    from helpers.method_runs import check_exact_resume

    out, args = replay_run
    raw = json.loads((out / "memory_step_1.json").read_text())
    assert raw["step"] == 1 and len(raw["images"]) == 6
    assert all(e["chosen_for"] == 0 and e["step"] == 0 for e in raw["images"])
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert steps[1]["memory"]["images"] == 6 and "holding" in steps[1]["memory"]["summary"]
    check_exact_resume(out, args, tmp_path)


def test_a_changed_replay_memory_file_is_named_on_resume(replay_run, tmp_path, capsys):
    import shutil

    from incseg.cli import main

    out, _ = replay_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    path = copy / "memory_step_1.json"
    raw = json.loads(path.read_text())
    raw["images"][0]["classes"] = [99]
    path.write_text(json.dumps(raw))
    (copy / "step_1.pt").unlink()
    code = main(["run", "--resume", str(copy), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "memory_step_1.json: not the exemplar memory of step 1" in err, err
