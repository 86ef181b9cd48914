import copy

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from resnet.models import create_model, list_models
from resnet.ema import ModelEma
from resnet.optim import create_optimizer, create_scheduler


def test_no_weight_decay_on_norms_and_biases():
    model = create_model("resnet_tiny_20k")
    opt = create_optimizer(model, "sgd", 0.1, 5e-4)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim <= 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("name, cls", [("sgd", "SGD"), ("nesterov", "SGD"), ("adam", "Adam"), ("adamw", "AdamW")])
def test_optimizer_choices(name, cls):
    opt = create_optimizer(create_model("resnet_tiny_20k"), name, 0.01, 0.0)
    assert type(opt).__name__ == cls
    if name == "nesterov":
        assert opt.param_groups[0]["nesterov"]


def test_lookahead_wraps_and_shares_the_lr():
    from timm.optim import Lookahead as TimmLookahead

    from resnet.techniques.lookahead import Lookahead

    opt = Lookahead().wrap_optimizer(create_optimizer(create_model("resnet_tiny_20k"), "sgd", 0.1, 0.0))
    assert isinstance(opt, TimmLookahead)
    sched = create_scheduler(opt, 100, 10, 0.01, 0.0)
    sched.step_update(50)
    assert opt._base_optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] < 0.1


@pytest.mark.parametrize("name", list_models())
def test_muon_takes_the_hidden_conv_filters_and_leaves_the_input_conv_and_head_to_sgd(name):
    model = create_model(name)
    opt = create_optimizer(model, "muon", 0.1, 5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [{names[id(p)] for p in g["params"]} for g in opt.param_groups]
    (muon,) = [members for g, members in zip(opt.param_groups, grouped) if g["muon"]]
    inputs = {f"{m}.{n}" for m, conv in model.named_modules() if isinstance(conv, nn.Conv2d) and conv.in_channels == 3
              for n, _ in conv.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not muon & inputs
    assert not {n for n in muon if model.get_parameter(n).ndim == 2}  # the head
    assert muon == {n for n in trainable - inputs if model.get_parameter(n).ndim == 4}
    assert sorted(n for members in grouped for n in members) == sorted(trainable)  # each in exactly one group
    decayed = grouped[0]
    assert opt.param_groups[0]["weight_decay"] == 5e-4 and not opt.param_groups[0]["muon"]
    assert {n for n in inputs & trainable if model.get_parameter(n).ndim == 4} <= decayed
    if name == "resnet_report_4m":
        assert "stem.0.0.weight" not in muon and "stem.0.0.weight" in decayed


def test_schedule_is_a_function_of_the_step():
    model = torch.nn.Linear(2, 2)
    opt = create_optimizer(model, "sgd", 1.0, 0.0)
    sched = create_scheduler(opt, total_steps=110, warmup_steps=10, warmup_lr_ratio=0.1, min_lr_ratio=0.0)
    lrs = {}
    for step in (0, 5, 10, 60, 110):
        sched.step_update(step)
        lrs[step] = opt.param_groups[0]["lr"]
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.55)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5, abs=1e-6) and lrs[110] == pytest.approx(0.0)
    # A fresh scheduler told the step (as after a resume) gives the same lr.
    again = create_scheduler(opt, 110, 10, 0.1, 0.0)
    again.step_update(60)
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[60])


def _count_ops(fn) -> int:
    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_model_ema_averages_as_timms_does_with_a_fixed_number_of_ops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(2, 3, 8, 8))
    ours, timms = ModelEma(model, decay=0.9, use_warmup=True), ModelEmaV3(model, decay=0.9, use_warmup=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 6):
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()  # BN stats and counters move too
        opt.step()
        opt.zero_grad()
        if step == 3:  # a resume loads weights in place: the EMA must follow them
            model.load_state_dict({k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()})
        ours.update(model, step=step)
        timms.update(model, step=step)
    mine, theirs = ours.module.state_dict(), timms.module.state_dict()
    assert mine["1.num_batches_tracked"].item() == 6  # the lazy first forward and 5 steps
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name
    # After the first update: one foreach copy (BN counters) and one foreach lerp, however big the net.
    assert _count_ops(lambda: ours.update(model, step=6)) == 2
    assert _count_ops(lambda: timms.update(model, step=6)) > 20
    # Another model object (a wrapper, a copy) is paired anew.
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.fill_(3.0)
    ours.decay = ours.min_decay = 0.0  # decay 0: the EMA becomes the model
    ours.update(other)
    assert all(torch.equal(p, torch.full_like(p, 3.0)) for p in ours.module.parameters())
