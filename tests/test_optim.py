import pytest
import torch

from resnet.models import create_model
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
    opt = create_optimizer(create_model("resnet_tiny_20k"), "sgd", 0.1, 0.0, lookahead=True)
    assert type(opt).__name__ == "Lookahead"
    sched = create_scheduler(opt, 100, 10, 0.01, 0.0)
    sched.step_update(50)
    assert opt._base_optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] < 0.1


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

