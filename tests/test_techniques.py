"""airbench's and Muon's techniques as options of the suite (issue 9): each one does what it says."""
import csv
import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from timm.optim.muon import zeropower_via_newtonschulz

from conftest import ROOT, TINY_RUN, run_cli, synthetic_images
from resnet import checkpoint, training
from resnet.techniques import lookahead_ema
from resnet.augment import normalize
from resnet.config import ConfigError, TrainConfig, load_recipe, parse_config
from resnet.data import MEAN, STD
from resnet.interrupt import Stopped
from resnet.loader import DeviceLoader, ImageDataset
from resnet.models import WhiteningConv, count_parameters, create_model, parse_head_scale
from resnet.optim import (FilterStack, LookaheadEMA, MuonSGD, create_optimizer, create_scheduler, param_groups,
                          per_1024_images)


def cifar_like(n: int, seed: int = 0) -> torch.Tensor:
    """Normalised float (n, 3, 32, 32) images from the synthetic CIFAR generator of the fixtures."""
    rows, _ = synthetic_images(n, seed)
    return normalize(torch.from_numpy(rows).view(n, 3, 32, 32).float() / 255, MEAN, STD)


def batch_norms(model: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


# ----------------------------------------------------------------------------------------------
# 1. whitening stem
def test_whitening_stem_whitens_the_patches_it_was_fitted_on():
    model = create_model("resnet_airbench_whiten_2m")
    stem = model.stem[0]
    assert isinstance(stem, WhiteningConv) and stem.out_channels == 24 and stem.kernel_size == (2, 2)
    x = cifar_like(200)
    model.init_whitening(x)
    w = stem.weight
    torch.testing.assert_close(w[12:], -w[:12])  # both signs of each of the 12 eigenvectors
    y = F.conv2d(x, w[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = y.T @ y / len(y)  # the second moment, as fitted (airbench does not centre)
    # eps = 5e-4 is tiny beside these eigenvalues: the covariance is the identity to within 1%.
    torch.testing.assert_close(covariance, torch.eye(12), atol=1e-2, rtol=0)
    assert not stem.weight.requires_grad and stem.bias.requires_grad


def test_whitening_eps_damps_the_small_eigenvalues():
    stem = WhiteningConv()
    x = cifar_like(100)
    stem.fit(x, eps=1.0)  # eps as large as the eigenvalues: the output variance is lambda / (lambda + eps) < 1
    y = F.conv2d(x, stem.weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
    variances = (y.T @ y / len(y)).diagonal()
    assert (variances < 0.99).all() and (variances > 0).all()


def test_any_net_takes_the_whitening_stem():
    model = create_model("resnet_tiny_20k", stem="whiten")
    assert isinstance(model.stem[0], WhiteningConv)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet_tiny_20k", stem="patchify")


def test_the_whitened_net_is_registered_beside_the_unchanged_ones():
    assert count_parameters(create_model("resnet_report_4m")) == 4_587_690
    plain, whitened = create_model("resnet_airbench_2m"), create_model("resnet_airbench_whiten_2m")
    assert not any(isinstance(m, WhiteningConv) for m in plain.modules())
    assert all(bn.weight.requires_grad for bn in batch_norms(plain))
    assert all(not bn.weight.requires_grad and bn.momentum == 0.4 and bn.eps == 1e-12 for bn in batch_norms(whitened))
    assert whitened.head_scale == pytest.approx(1 / 9)


# ----------------------------------------------------------------------------------------------
# 2. BatchNorm with frozen scales, momentum, eps
def test_frozen_batchnorm_scales_stay_exactly_one_through_training_steps():
    torch.manual_seed(0)
    model = create_model("resnet_tiny_20k", bn_frozen_weight=True, bn_momentum=0.4, bn_eps=1e-12)
    bns = batch_norms(model)
    assert bns and all(bn.momentum == 0.4 and bn.eps == 1e-12 and not bn.weight.requires_grad for bn in bns)
    opt = create_optimizer(model, "nesterov", 0.5, 5e-3, norm_bias_lr_scale=64)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in bns)
    assert any(bn.bias.abs().sum() > 0 for bn in bns)  # while the biases did train


# ----------------------------------------------------------------------------------------------
# 3. dirac init, head scale
def test_dirac_conv_passes_its_input_through_on_the_identity_part():
    model = create_model("resnet_airbench_2m", dirac=True)
    torch.manual_seed(0)
    same = model.stages[1].conv[0][0]  # 256 -> 256: every filter is an identity
    x = torch.randn(2, 256, 8, 8)
    torch.testing.assert_close(F.conv2d(x, same.weight, padding=1), x, rtol=0, atol=0)
    wider = model.stages[0].down[0]  # 24 -> 64: the first 24 filters are, the other 40 keep their random init
    x = torch.randn(2, 24, 8, 8)
    out = F.conv2d(x, wider.weight, padding=1)
    torch.testing.assert_close(out[:, :24], x, rtol=0, atol=0)
    assert not torch.allclose(out[:, 24:48], x)
    without = create_model("resnet_airbench_2m").stages[1].conv[0][0]
    assert not torch.equal(without.weight[:, :, 1, 1].diagonal(), torch.ones(256))


def test_dirac_leaves_the_whitening_filters_alone():
    model = create_model("resnet_airbench_whiten_2m")
    model.init_whitening(cifar_like(50))
    w = model.stem[0].weight
    assert not torch.equal(w[:3, :, 0, 0], torch.eye(3))
    torch.testing.assert_close(w[12:], -w[:12])


@pytest.mark.parametrize("value, expected", [(0.5, 0.5), ("1/9", 1 / 9), ("0.25", 0.25), ("1/width", 1 / 32)])
def test_head_scale_is_a_constant_or_one_over_width(value, expected):
    torch.manual_seed(0)
    model = create_model("resnet_tiny_20k", head_scale=value).eval()  # 32 features into the head
    assert model.head_scale == pytest.approx(expected)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(model.forward_features(x)) * expected)


@pytest.mark.parametrize("bad", ["abc", "1/0", "-1", "0", "1/height"])
def test_head_scale_rejects_what_it_cannot_read(bad):
    with pytest.raises(ValueError, match="head_scale"):
        parse_head_scale(bad, 32)


# ----------------------------------------------------------------------------------------------
# 4. norm-bias lr multiplier, lr per 1024 images
def test_norm_biases_get_their_own_lr_and_every_trainable_parameter_one_group():
    model = create_model("resnet_airbench_whiten_2m", widths=(8, 16, 16))
    groups = param_groups(model, 5e-4, 0.1, norm_bias_lr_scale=64, whiten_bias_steps=30)
    norm_biases = {id(bn.bias) for bn in batch_norms(model)}
    by_lr = {g["lr"]: g for g in groups if g["params"]}
    assert {id(p) for p in by_lr[6.4]["params"]} == norm_biases and by_lr[6.4]["weight_decay"] == 0.0
    whiten = [g for g in groups if "train_steps" in g]
    assert len(whiten) == 1 and whiten[0]["params"] == [model.stem[0].bias] and whiten[0]["train_steps"] == 30
    placed = [id(p) for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each exactly once
    assert id(model.stem[0].weight) not in placed  # frozen: in no group
    decayed = groups[0]
    assert decayed["weight_decay"] == 5e-4 and all(p.ndim > 1 for p in decayed["params"])
    # Without the multiplier the layout stays the two groups it always was.
    assert len(param_groups(create_model("resnet_tiny_20k"), 5e-4, 0.1)) == 2


def test_lr_per_1024_images_scales_with_the_global_batch():
    assert per_1024_images(2.0, 1024) == 2.0
    assert per_1024_images(2.0, 256) == 0.5
    assert per_1024_images(2.0, 2048) == 4.0


@pytest.mark.slow
def test_lr_unit_image1024_reaches_the_optimizer(cifar_dir, tmp_path):
    out = _train([*FOUR_STEPS, "--data-dir", str(cifar_dir), "--epochs", "1",
                  "--lr-unit", "image1024", "--lr", "2.0", "--warmup-epochs", "0", "--min-lr-ratio", "1",
                  "--run-dir", str(tmp_path / "r")])
    assert out["lr"] == pytest.approx(2.0 * 30 / 1024)  # the schedule is flat here: the peak lr is all there is


# ----------------------------------------------------------------------------------------------
# 5. lookahead-EMA
def test_lookahead_ema_follows_airbenchs_update_rule():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    la = LookaheadEMA(model, every=2, decay=0.9, power=1.0, start_step=2, total_steps=10)

    def set_weights(value: float) -> None:
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.fill_(value)

    set_weights(1.0)
    for step in (1, 2, 3):  # not after start_step, or not a multiple of every
        la.step(step)
        assert la.ema is None
    la.step(4)  # the first due step takes the copy and moves nothing
    assert all(torch.equal(v, torch.ones_like(v)) for v in la.ema.values())
    assert "1.num_batches_tracked" not in la.ema  # integers do not take part
    set_weights(3.0)
    la.step(5)  # not due
    assert model[0].weight[0, 0] == 3.0
    la.step(6)
    rho = 0.9 ** 2 * (6 / 10) ** 1.0  # decay rises with progress
    expected = 1.0 + (1 - rho) * (3.0 - 1.0)
    for name, t in model.state_dict().items():
        if t.is_floating_point():  # BatchNorm running statistics included
            torch.testing.assert_close(t, torch.full_like(t, expected), msg=name)
            torch.testing.assert_close(la.ema[name], t)
    set_weights(7.0)
    la.sync()  # the end of an epoch: the weights become the EMA, which does not move
    torch.testing.assert_close(model[0].weight, torch.full_like(model[0].weight, expected))
    restored = LookaheadEMA(model, 2, 0.9, 1.0, 2, 10)
    restored.load_state_dict(la.state_dict())
    assert restored.ema.keys() == la.ema.keys()


def test_lookahead_ema_decay_rises_with_progress():
    la = LookaheadEMA(torch.nn.Linear(1, 1), every=5, decay=0.95, power=3.0, start_step=0, total_steps=100)
    assert la.rho(100) == pytest.approx(0.95 ** 5) and la.rho(50) == pytest.approx(0.95 ** 5 / 8)
    assert la.rho(10) < la.rho(50) < la.rho(90)


# ----------------------------------------------------------------------------------------------
# 6. alternating flip
def _mirrored(batches, images: torch.Tensor) -> dict[int, bool]:
    """Image index -> whether the loader gave it mirrored (labels are the indices)."""
    seen = {}
    for x, y in batches:
        for img, i in zip(x, y.tolist()):
            if torch.equal(img, images[i]):
                seen[i] = False
            elif torch.equal(img, images[i].flip(-1)):
                seen[i] = True
            else:
                raise AssertionError(f"image {i} came out neither as itself nor mirrored")
    return seen


def _device_flips(images: np.ndarray, world_size: int, epoch: int, seed: int = 3) -> dict[int, bool]:
    seen = {}
    for rank in range(world_size):
        loader = DeviceLoader(images, np.arange(len(images)), 8, torch.device("cpu"), lambda x, gen: x, seed=seed,
                              rank=rank, world_size=world_size, alternate_flip=True)
        loader.set_epoch(epoch)
        seen.update(_mirrored(loader, torch.from_numpy(images.transpose(0, 3, 1, 2))))
    return seen


def test_alternating_flip_mirrors_every_image_on_exactly_one_of_two_epochs():
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    flips = [_device_flips(images, 1, epoch) for epoch in range(3)]
    assert all(len(f) == 64 for f in flips)
    assert all(flips[0][i] != flips[1][i] for i in range(64))  # each image once each way
    assert flips[2] == flips[0]  # the half is fixed for the run
    assert 16 <= sum(flips[0].values()) <= 48  # a random half, not all or none
    # The same images whatever the process count, and on the per-image worker path.
    assert _device_flips(images, 2, 0) == flips[0] and _device_flips(images, 2, 1) == flips[1]
    dataset = ImageDataset(images, np.arange(64), lambda im: torch.from_numpy(np.asarray(im).copy()), seed=3,
                           alternate_flip=True)
    for epoch in (0, 1):
        worker = {i: not torch.equal(dataset[(i, epoch)][0], torch.from_numpy(images[i])) for i in range(64)}
        assert worker == flips[epoch]
    assert _device_flips(images, 1, 0, seed=4) != flips[0]  # another seed, another half


def test_flip_alternate_turns_the_random_flip_off():
    cfg = parse_config(TrainConfig, ["--flip", "alternate", "--hflip", "0.5"])
    assert training.augment_config(cfg).hflip == 0.0
    assert training.augment_config(parse_config(TrainConfig, ["--hflip", "0.5"])).hflip == 0.5


# ----------------------------------------------------------------------------------------------
# 7. linear schedule, fractional epochs
def test_linear_schedule_rises_then_falls_in_straight_lines():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 64.0}])
    sched = create_scheduler(opt, total_steps=100, warmup_steps=23, warmup_lr_ratio=0.2, min_lr_ratio=0.07,
                             kind="linear")
    expected = {0: 0.2, 11.5: 0.6, 23: 1.0, 42.25: 1 - 0.93 / 4, 61.5: (1 + 0.07) / 2, 100: 0.07, 150: 0.07}
    for step, factor in expected.items():
        sched.step_update(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(factor), step
        assert opt.param_groups[1]["lr"] == pytest.approx(64 * factor), step  # relative per group


def test_a_group_with_train_steps_stops_exactly_there():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "train_steps": 3}], lr=0.1,
                          momentum=0.9, nesterov=True)
    sched = create_scheduler(opt, 10, 0, 1.0, 0.0)
    history = []
    for step in range(6):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().sum().backward()
        opt.step()
        sched.step_update(step + 1)
        history.append(model.bias.detach().clone())
    assert not torch.equal(history[1], history[2])  # the third update still trains it
    assert all(torch.equal(history[2], h) for h in history[3:])  # momentum included, it stops dead


def _train(args: list[str]) -> dict:
    return training.train(parse_config(TrainConfig, args))


# 120 training images at batch 30: 4 steps per epoch.
FOUR_STEPS = [*TINY_RUN, "--batch-size", "30", "--train-subset", "120", "--wandb", "off"]


@pytest.mark.slow
def test_fractional_epochs_cut_the_last_epoch_and_end_on_the_lookahead_ema(cifar_dir, tmp_path, monkeypatch):
    made = []

    class Recorded(LookaheadEMA):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(lookahead_ema, "Average", Recorded)
    out = _train([*FOUR_STEPS, "--data-dir", str(cifar_dir), "--epochs", "1.5", "--schedule", "linear", "--lr", "0.1",
                  "--min-lr-ratio", "0.07", "--lookahead-ema", "4", "--lookahead-ema-start", "0.5",
                  "--run-dir", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "4"), ("2", "6")]  # 1 full + half an epoch
    assert float(rows[-1]["lr"]) == pytest.approx(0.1)  # the cut epoch's first update: the peak, after warm-up
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["finished"] and summary["epochs"] == 1.5
    assert "val_acc" in rows[-1]
    # Step 6 is not an EMA step (every 4), yet the run ends on the EMA: the epoch's end synced the weights to it.
    (la,) = made
    state = out["model"].state_dict()
    for name, ema in la.ema.items():
        torch.testing.assert_close(state[name], ema, rtol=0, atol=0, msg=name)


# ----------------------------------------------------------------------------------------------
# 8. Muon
def test_muon_on_conv_filters_and_nesterov_sgd_on_the_rest():
    torch.manual_seed(0)
    model = create_model("resnet_airbench_whiten_2m", widths=(8, 16, 16))
    model.init_whitening(cifar_like(20))
    opt = create_optimizer(model, "muon", 0.05, 5e-4, 0.85, norm_bias_lr_scale=64, whiten_bias_steps=30,
                           muon_lr=0.24, muon_momentum=0.6)
    assert isinstance(opt, MuonSGD)
    (muon,) = [g for g in opt.param_groups if g["muon"]]
    filters = [p for p in model.parameters() if p.ndim == 4 and p.requires_grad]
    assert muon["params"] == filters and muon["lr"] == 0.24 and muon["muon_momentum"] == 0.6
    assert all(p is not model.stem[0].weight for p in muon["params"])  # frozen whitening filters excluded
    sgd = [g for g in opt.param_groups if not g["muon"]]
    in_sgd = {id(p) for g in sgd for p in g["params"]}
    assert {id(model.head.weight), id(model.stem[0].bias)} | {id(bn.bias) for bn in batch_norms(model)} <= in_sgd
    assert all(g["nesterov"] and g["momentum"] == 0.85 for g in sgd)

    x, y = cifar_like(8), torch.arange(8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    after = dict(model.named_parameters())
    for name, w in before.items():
        if w.ndim == 4 and after[name].requires_grad:
            # airbench's Muon step: rescale the filter bank to norm sqrt(out), then subtract lr x the
            # orthogonalised (out, in*k*k) Nesterov momentum update.
            g = grads[name]
            nesterov = g.lerp(torch.zeros_like(g).lerp_(g, 1 - 0.6), 0.6)  # timm's buffer form, from zero
            ortho = zeropower_via_newtonschulz(nesterov.reshape(len(w), -1), 3, [(3.4445, -4.7750, 2.0315)],
                                               dtype=opt.ns_dtype)
            ortho = ortho.float().view_as(w)
            expected = w * (len(w) ** 0.5 / w.norm()) - 0.24 * ortho
            # One batched chain for all filters here, one per filter there: the same up to rounding.
            atol = 1e-5 if opt.ns_dtype == torch.float32 else 0.24 * 1e-2
            torch.testing.assert_close(after[name].detach(), expected, rtol=0, atol=atol)
            assert not torch.equal(after[name], w)
    assert torch.equal(after["stem.0.weight"], before["stem.0.weight"])


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_batched_newton_schulz_matches_one_chain_per_filter(dtype, atol):
    """Filters of different shapes (a tall 1x1 bank among them), padded into one stack: each result is its own."""
    torch.manual_seed(0)
    shapes = [(64, 24, 3, 3), (64, 64, 3, 3), (32, 16, 3, 3), (256, 8, 1, 1), (64, 64, 3, 3)]
    updates = [torch.randn(s) for s in shapes]
    filters = FilterStack(updates)  # as MuonSGD uses it: write through the views, one chain, read back
    torch._foreach_copy_(filters.views, updates)
    filters.orthogonalise(3, dtype)
    batched = filters.views
    for u, b in zip(updates, batched):
        one = zeropower_via_newtonschulz(u.reshape(len(u), -1), 3, [(3.4445, -4.7750, 2.0315)], dtype=dtype)
        assert b.shape == u.shape
        torch.testing.assert_close(b.float(), one.float().view_as(u), rtol=0, atol=atol)


def test_muon_runs_its_newton_schulz_in_the_precision_the_device_computes_fast(monkeypatch):
    from resnet import hardware

    model = create_model("resnet_tiny_20k")
    for forced, dtype in (("0", torch.float32), ("1", torch.bfloat16)):
        monkeypatch.setenv(hardware.FORCE_ENV, forced)
        assert create_optimizer(model, "muon", 0.1, 0.0).ns_dtype == dtype  # a CPU: compiled only on CUDA


def test_muons_sgd_part_is_pytorchs_nesterov_sgd():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    b = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    b.load_state_dict(a.state_dict())
    ours = create_optimizer(a, "muon", 0.1, 1e-2, 0.9)
    theirs = create_optimizer(b, "nesterov", 0.1, 1e-2, 0.9)
    for _ in range(3):
        x = torch.randn(5, 4)
        for model, opt in ((a, ours), (b, theirs)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# flags: one clear line naming the flag
@pytest.mark.parametrize("argv, flag", [
    (["--epochs", "0"], "--epochs"),
    (["--bn-momentum", "1.5"], "--bn-momentum"),
    (["--bn-eps", "0"], "--bn-eps"),
    (["--head-scale", "abc"], "--head-scale"),
    (["--head-scale", "-2"], "--head-scale"),
    (["--norm-bias-lr-scale", "-1"], "--norm-bias-lr-scale"),
    (["--lr-unit", "image1024"], "--lr-unit"),
    (["--lr-unit", "image1024", "--lr", "1", "--lr-scale", "linear"], "--lr-scale"),
    (["--muon-lr", "0"], "--muon-lr"),
    (["--muon-momentum", "1"], "--muon-momentum"),
    (["--whiten-bias-epochs", "-1"], "--whiten-bias-epochs"),
    (["--lookahead-ema", "-5"], "--lookahead-ema"),
    (["--lookahead-ema-decay", "0"], "--lookahead-ema-decay"),
    (["--lookahead-ema-power", "-1"], "--lookahead-ema-power"),
    (["--lookahead-ema-start", "-1"], "--lookahead-ema-start"),
])
def test_out_of_range_technique_flags_fail_naming_the_flag(argv, flag):
    with pytest.raises(ConfigError) as e:
        training.check_config(parse_config(TrainConfig, argv))
    assert str(e.value).startswith(f"{flag}:") and "\n" not in str(e.value)


def test_technique_flags_reach_the_model_and_its_checkpoint_metadata():
    cfg = parse_config(TrainConfig, ["--model", "resnet_tiny_20k", "--stem", "whiten", "--bn-eps", "1e-12",
                                     "--no-dirac", "--head-scale", "1/width"])
    assert training.model_kwargs(cfg) == {"stem": "whiten", "bn_eps": 1e-12, "dirac": False, "head_scale": "1/width"}
    model = training.build_model(cfg)
    assert isinstance(model.stem[0], WhiteningConv) and model.head_scale == 1 / 32
    assert training.model_kwargs(parse_config(TrainConfig, [])) == {}  # unset: each net keeps its own


def test_the_airbench_recipe_reads_and_passes_the_checks():
    values = load_recipe(TrainConfig, ROOT / "configs" / "fast_airbench.yaml")
    cfg = TrainConfig(**values)
    training.check_config(cfg)
    assert cfg.model == "resnet_airbench_whiten_2m" and cfg.epochs == 9.9 and cfg.lr_unit == "image1024"
    assert (cfg.flip, cfg.schedule, cfg.lookahead_ema, cfg.norm_bias_lr_scale) == ("alternate", "linear", 5, 64.0)


# ----------------------------------------------------------------------------------------------
# in tiny training runs
@pytest.mark.slow
def test_whitening_bias_freezes_after_its_epochs_and_bn_scales_stay_one(cifar_dir, tmp_path, monkeypatch):
    seen = []
    real = training.end_epoch

    def record(run, *a, **k):
        seen.append({n: t.detach().clone() for n, t in run.parts.model.state_dict().items()})
        return real(run, *a, **k)

    monkeypatch.setattr(training, "end_epoch", record)
    _train([*FOUR_STEPS, "--data-dir", str(cifar_dir), "--epochs", "3", "--stem", "whiten", "--bn-frozen-weight",
            "--dirac", "--whiten-bias-epochs", "2", "--opt", "nesterov", "--lr", "0.2", "--norm-bias-lr-scale", "8",
            "--run-dir", str(tmp_path)])
    filters, bias = [s["stem.0.weight"] for s in seen], [s["stem.0.bias"] for s in seen]
    assert torch.count_nonzero(bias[0]) and not torch.equal(bias[0], bias[1])  # trained in epochs 1 and 2
    assert torch.equal(bias[1], bias[2])  # frozen in epoch 3
    assert torch.equal(filters[0], filters[2])  # the filters never move
    torch.testing.assert_close(filters[0][12:], -filters[0][:12])  # and were fitted (both signs)
    for name, t in seen[-1].items():
        if name.endswith(".weight") and t.ndim == 1:  # the BatchNorm scales
            assert torch.equal(t, torch.ones_like(t)), name
    # evaluate.py / predict.py rebuild the same net from the checkpoint's metadata.
    model, meta, _ = checkpoint.load_checkpoint(tmp_path / "last.safetensors")
    assert meta["model_kwargs"]["stem"] == "whiten" and isinstance(model.stem[0], WhiteningConv)
    torch.testing.assert_close(model.stem[0].bias, bias[2])


@pytest.mark.slow
def test_a_stop_in_the_cut_last_epoch_resumes_exactly_with_every_technique_on(cifar_dir, tmp_path, monkeypatch):
    args = [*FOUR_STEPS, "--data-dir", str(cifar_dir), "--epochs", "1.5", "--stem", "whiten", "--bn-frozen-weight",
            "--dirac", "--opt", "muon", "--lr", "2", "--lr-unit", "image1024", "--norm-bias-lr-scale", "64",
            "--whiten-bias-epochs", "1.2", "--lookahead-ema", "2", "--lookahead-ema-start", "0.5", "--flip",
            "alternate", "--schedule", "linear", "--warmup-epochs", "0.3", "--min-lr-ratio", "0.07"]
    straight = _train([*args, "--run-dir", str(tmp_path / "a")])
    real = training.train_epoch

    def stop_after_one_step_of_epoch_2(parts, loader, schedule, plan, stop, *a, **k):
        if plan.epoch == 1:
            stop.signum = signal.SIGTERM  # as its handler does: a single process stops after the step
        return real(parts, loader, schedule, plan, stop, *a, **k)

    monkeypatch.setattr(training, "train_epoch", stop_after_one_step_of_epoch_2)
    with pytest.raises(Stopped):
        _train([*args, "--run-dir", str(tmp_path / "b")])
    trainer = json.loads((tmp_path / "b/state/trainer.json").read_text())
    assert (trainer["epoch"], trainer["step_in_epoch"]) == (1, 1)
    monkeypatch.setattr(training, "train_epoch", real)
    resumed = _train(["--resume", str(tmp_path / "b")])
    assert (resumed["epoch"], resumed["step"]) == (straight["epoch"], straight["step"]) == (2, 6)
    a, b = load_file(str(tmp_path / "a/last.safetensors")), load_file(str(tmp_path / "b/last.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_the_airbench_recipe_runs_under_accelerate_launch(cifar_dir, tmp_path):
    """configs/fast_airbench.yaml end to end on the synthetic data, cut to seconds: 96 images, 1.5 epochs."""
    proc = run_cli("train.py", "--config", "configs/fast_airbench.yaml", "--data-dir", str(cifar_dir),
                   "--no-download", "--no-progress", "--wandb", "off", "--val-split", "100", "--train-subset", "96",
                   "--batch-size", "32", "--epochs", "1.5", "--whiten-bias-epochs", "1", "--lookahead-ema-start",
                   "0.3", "--lookahead-ema", "1", "--run-dir", str(tmp_path / "r"))
    assert "lr 0.046875 (1.5 per 1024 images)" in proc.stdout  # 1.5 x 32 / 1024
    assert "resnet_airbench_whiten_2m" in proc.stdout and "epoch 2/2 (1/3 steps: 1.33 epochs in all" in proc.stdout
    rows = list(csv.DictReader((tmp_path / "r/metrics.csv").open()))
    assert [r["step"] for r in rows] == ["3", "4"] and all(math.isfinite(float(r["train_loss"])) for r in rows)
    config = (tmp_path / "r/config.yaml").read_text()
    assert "flip: alternate" in config and "lr_unit: image1024" in config
    assert Path(tmp_path / "r/best.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                         if p.name != "fast_airbench.yaml"))  # that one has its own test above
def test_every_shipped_recipe_trains(recipe, cifar_dir, tmp_path):
    """Each recipe in configs/ parses and trains (a few steps on the synthetic data), its own settings kept
    (compiling left out: it takes ~30 s on a CPU)."""
    proc = run_cli("train.py", "--config", f"configs/{recipe}", "--data-dir", str(cifar_dir), "--no-download",
                   "--no-progress", "--wandb", "off", "--val-split", "100", "--train-subset", "64",
                   "--batch-size", "32", "--epochs", "1", "--no-compile", "--run-dir", str(tmp_path / "r"),
                   config=None)
    assert proc.returncode == 0, proc.stderr
    recipe_keys = yaml.safe_load((ROOT / "configs" / recipe).read_text())
    saved = yaml.safe_load((tmp_path / "r/config.yaml").read_text())
    for key, value in recipe_keys.items():
        if key not in ("batch_size", "epochs", "compile"):
            assert saved[key] == pytest.approx(value) if isinstance(value, float) else saved[key] == value, key
    rows = list(csv.DictReader((tmp_path / "r/metrics.csv").open()))
    assert len(rows) == 1 and math.isfinite(float(rows[0]["train_loss"]))


@pytest.mark.parametrize("opt_name", ["sgd", "muon"])
def test_lookahead_leaves_the_stopped_whitening_bias_where_it_stopped(opt_name):
    from resnet.techniques.lookahead import Lookahead

    torch.manual_seed(0)
    model = create_model("resnet_airbench_whiten_2m", widths=(8, 16, 16))
    model.init_whitening(cifar_like(20))
    # Stopped at 8: between Lookahead's syncs at 6 and 12, so the slow bias lags the stopped one.
    base = create_optimizer(model, opt_name, 0.1, 5e-4, 0.85, whiten_bias_steps=8)
    opt = Lookahead().wrap_optimizer(base)
    sched = create_scheduler(opt, 14, 0, 1.0, 0.0)
    bias, history = model.stem[0].bias, []
    for step in range(1, 15):
        opt.zero_grad()
        F.cross_entropy(model(cifar_like(8, seed=step)), torch.arange(8)).backward()
        opt.step()
        sched.step_update(step)
        history.append(bias.detach().clone())
        if step == 12:  # the other groups still sync: the fast weights jumped to the slow ones
            assert torch.equal(model.head.weight, base.state[model.head.weight]["lookahead_slow_buff"])
    assert not torch.equal(history[6], history[7])  # the eighth update still trains it
    assert all(torch.equal(history[7], h) for h in history[8:]), "the lookahead sync at step 12 moved it"
