"""MiB's classifier initialisation and loss terms; method lookup."""

import pytest
import torch

from incseg.config import MethodConfig, config_from_dict
from incseg.errors import ConfigError
from incseg.losses import cross_entropy
from incseg.methods import METHODS, FineTuning, MiB
from incseg.models import build_segmenter
from incseg.protocol import get_setting, step_info


def _grown_model(new_channels=3):
    torch.manual_seed(0)
    model = build_segmenter("tiny", (4,), head_channels=8).eval()
    with torch.no_grad():  # a non-trivial background bias
        model.classifiers[0].bias.copy_(torch.tensor([0.7, -0.2, 0.1, 0.3]))
    images = torch.randn(2, 3, 32, 32)
    before = torch.softmax(model(images).logits, dim=1)
    model.add_classifier(new_channels)
    return model, images, before


def test_balanced_init_keeps_old_probabilities_and_splits_background():
    model, images, before = _grown_model(new_channels=3)
    info = step_info(get_setting("voc", "15-5"), 1)  # any step > 0
    MiB().init_new_classifier(model, info)
    after = torch.softmax(model(images).logits, dim=1)
    assert after.shape[1] == 7
    torch.testing.assert_close(after[:, 1:4], before[:, 1:4])  # old classes unchanged
    share = before[:, :1] / 4  # background and the 3 new classes split p(bg) equally
    for channel in (0, 4, 5, 6):
        torch.testing.assert_close(after[:, channel : channel + 1], share)


def test_random_init_option_leaves_classifier_alone():
    model, _, _ = _grown_model()
    weights = model.classifiers[-1].weight.clone()
    MiB(init="random").init_new_classifier(model, step_info(get_setting("voc", "15-5"), 1))
    assert torch.equal(weights, model.classifiers[-1].weight)


def test_mib_loss_terms():
    info0 = step_info(get_setting("voc", "15-5"), 0)
    info1 = step_info(get_setting("voc", "15-5"), 1)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 21, 4, 4, generator=gen)
    old = torch.randn(2, 16, 4, 4, generator=gen)
    targets = torch.randint(0, 21, (2, 4, 4), generator=gen)

    class Out:
        def __init__(self, logits):
            self.logits = logits

    terms0 = MiB().losses(Out(logits[:, :16]), None, targets.clamp(max=15), info0)
    assert set(terms0) == {"ce"}
    terms = MiB(kd_weight=10).losses(Out(logits), Out(old), targets, info1)
    assert set(terms) == {"unce", "unkd"}
    terms100 = MiB(kd_weight=100).losses(Out(logits), Out(old), targets, info1)
    torch.testing.assert_close(terms100["unkd"], 10 * terms["unkd"])
    ablation = MiB(unce=False, unkd=False).losses(Out(logits), Out(old), targets, info1)
    torch.testing.assert_close(ablation["ce"], cross_entropy(logits, targets))
    ft = FineTuning().losses(Out(logits), None, targets, info1)
    torch.testing.assert_close(ft["ce"], cross_entropy(logits, targets))


def test_method_lookup_and_validation():
    assert set(METHODS) >= {"ft", "mib"}
    assert isinstance(MethodConfig("mib", {"kd_weight": 100.0}).build(), MiB)
    with pytest.raises(ConfigError, match="ft"):
        MethodConfig("icarl", {}).build()
    with pytest.raises(
        ConfigError,
        match=r"method.init: unknown value 'zeros'; valid choices: \['balanced', 'random'\]",
    ):
        config_from_dict({"method": {"name": "mib", "init": "zeros"}})


# Which built-in methods (and, as "+name", add-ons) implement each hook of the interface
# (docs/design.md has this table); a hook that none implements does not belong in the interface.
HOOK_USERS = {
    "init_new_classifier": {"mib", "plop", "rcil", "reminder", "ssul", "dkd", "+ewf", "eclipse"},
    "begin_step": {
        "eclipse",
        "ewc",
        "pi",
        "rw",
        "plop",
        "rcil",
        "reminder",
        "ssul",
        "dkd",
        "star",
        "+ewf",
        "+nest",
        "simcis",
    },
    "param_groups": {
        "ssul",
        "dkd",
        "star",
        "comformer",
        "comformer_ft",
        "m2f_ft",
        "m2f_mib",
        "m2f_plop",
        "balconpas",
        "eclipse",
        "simcis",
    },
    "memory_lut": {"ssul", "balconpas"},
    "memory_pseudo_labels": {"ssul", "dkd", "star"},
    "scan": {"plop", "reminder", "star", "simcis"},
    "end_scan": {"plop", "reminder", "star", "simcis"},
    "relabel": {"plop", "reminder", "ssul", "simcis"},
    "losses": {
        "ft",
        "m2f_ft",
        "comformer_ft",
        "comformer",
        "m2f_mib",
        "m2f_plop",
        "balconpas",
        "eclipse",
        "lwf",
        "lwf_mc",
        "ilt",
        "ewc",
        "pi",
        "rw",
        "mib",
        "plop",
        "rcil",
        "reminder",
        "ssul",
        "dkd",
        "star",
        "+ucd",
        "simcis",
    },
    "prepare_step": {"star", "+nest"},
    "prepare_passes": {"+nest"},
    "after_backward": {"ewc", "pi", "rw"},
    "end_step": {"ewc", "pi", "rw", "+ewf", "simcis"},
    "after_training": {"reminder", "star"},
    "state_dict": {"ewc", "pi", "rw", "reminder", "star", "simcis"},
    "load_state_dict": {"ewc", "pi", "rw", "reminder", "star", "simcis"},
    "step_state_dict": {"ewc", "pi", "rw", "plop", "reminder", "star", "simcis"},
    "load_step_state_dict": {"ewc", "pi", "rw", "plop", "reminder", "star", "simcis"},
    "stores": {"simcis"},
}


def test_every_hook_is_implemented_by_a_built_in_method():
    from incseg.methods import ADDON_PATHS, addon_class
    from incseg.methods.base import AddOn, Method

    hooks = {n for n, v in vars(Method).items() if callable(v) and not n.startswith("_")}
    assert hooks == set(HOOK_USERS)
    for hook, users in HOOK_USERS.items():
        implementing = {
            n for n, cls in METHODS.items() if getattr(cls, hook) is not getattr(Method, hook)
        }
        implementing |= {
            f"+{n}"
            for n in ADDON_PATHS
            if getattr(addon_class(n), hook, None) not in (None, getattr(AddOn, hook, None))
        }
        assert implementing == users, hook


def test_every_add_on_hook_is_implemented_by_an_add_on():
    from incseg.methods import ADDON_PATHS, addon_class
    from incseg.methods.base import AddOn

    hooks = {n for n, v in vars(AddOn).items() if callable(v) and not n.startswith("_")}
    assert hooks == {
        "replaces_classifier_init",
        "init_new_classifier",
        "begin_step",
        "prepare_step",
        "prepare_passes",
        "losses",
        "end_step",
    }
    for hook in hooks:
        assert any(
            getattr(addon_class(n), hook) is not getattr(AddOn, hook) for n in ADDON_PATHS
        ), hook
