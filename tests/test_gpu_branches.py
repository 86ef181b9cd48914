"""The branches a GPU takes, run on a CPU wherever torch can run them there (issue 27).

Each branch is chosen by a parameter the tests set (``fused``, ``compile_ns``, ``gpu_modes``), the default
rule being "on CUDA"; each forced branch is checked against the CPU default for a few steps of a real net.
What a CPU cannot run at all, and why:
- cudnn.benchmark (distributed.create_accelerator): a cuDNN flag; CPU convolutions (oneDNN) never read it.
- fp16 (Accelerate's GradScaler): refused on a CPU (tests/test_accelerator.py). The scaler itself runs on a
  CPU, and drives MuonSGD's amp path here.
- the CUDA graphs of compile modes reduce-overhead / max-autotune: they capture CUDA kernels; inductor
  skips them for CPU tensors. Compiling a net costs 10-20 s here, so compile_model is checked with a mock.
- pin_memory (loader): pinning needs an accelerator; DataLoader leaves it off without one.
"""
import contextlib
import sys
import time
from collections import Counter
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from test_techniques import cifar_like

from resnet import optim, training
from resnet.models import create_model
from resnet.optim import DEFAULT_LR, create_optimizer

sys.path.insert(0, str(ROOT / "bench"))
# the bench's counter: the test and the figure agree
from host_ops import counting_read_backs

STEPS = 3


def report_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet_report_4m", widths=[8, 16, 32, 64])


def whitened_net() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet_airbench_whiten_2m", widths=[8, 16, 16])
    model.init_whitening(cifar_like(20))
    return model


def twin(make) -> tuple[torch.nn.Module, torch.nn.Module]:
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    return a, b


def batches(n: int = STEPS, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(cifar_like(size, seed=i + 1), torch.arange(size) % 10) for i in range(n)]


def train(model, opt, data) -> list[dict[str, torch.Tensor]]:
    """The params after each of the steps."""
    after = []
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        after.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return after


def assert_close(got, expected, rtol: float, atol: float, where: str) -> None:
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")


def assert_same_updates(a: list[dict], b: list[dict], rtol: float, atol: float) -> None:
    for step, (pa, pb) in enumerate(zip(a, b)):
        for name in pa:
            assert_close(pb[name], pa[name], rtol, atol, f"step {step} {name}")


# 1. The optimizers: fused kernels (CUDA's default) run on a CPU too.

def test_the_cpu_default_is_foreach_and_eager_newton_schulz():
    model = report_net()
    for name in ("sgd", "adam", "adamw"):
        opt = create_optimizer(model, name, 0.1, 5e-4)
        assert opt.defaults["foreach"] and not opt.defaults["fused"]
    model = whitened_net()
    muon = create_optimizer(model, "muon", 0.05, 5e-4)
    assert not muon._fused and muon.compile_ns is None
    with mock.patch.object(optim, "_compiled_newton_schulz", side_effect=AssertionError("compiled on a CPU")), \
            mock.patch("torch.compile", side_effect=AssertionError("compiled on a CPU by default")):
        train(model, muon, batches(1))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_optimizers_update_like_the_foreach_default(name):
    """CUDA's fused kernels, forced on a CPU, at the default lrs: the same params as foreach after each step,
    to fp32 rounding (the kernels order the same arithmetic differently): 1e-6 for SGD; for Adam(W) lr x 5e-3,
    as Adam divides by sqrt(v) + eps, which turns a rounding difference of a ~0 gradient into up to ~1e-3 of
    the lr at a few entries (seen: 2.4e-6 at lr 2e-3)."""
    a, b = twin(report_net)
    lr = DEFAULT_LR[name]
    default = create_optimizer(a, name, lr, 5e-4)
    fused = create_optimizer(b, name, lr, 5e-4, fused=True)
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    data = batches()
    atol = 1e-6 if name == "sgd" else lr * 5e-3
    assert_same_updates(train(a, default, data), train(b, fused, data), rtol=1e-5, atol=atol)


def test_muons_fused_sgd_part_updates_like_the_foreach_default():
    a, b = twin(whitened_net)
    kw = {"norm_bias_lr_scale": 64, "whiten_bias_steps": 30}
    default = create_optimizer(a, "muon", 0.05, 5e-4, 0.85, **kw)
    fused = create_optimizer(b, "muon", 0.05, 5e-4, 0.85, fused=True, **kw)
    assert fused._fused and fused.compile_ns is None
    data = batches()
    with mock.patch.object(optim, "sgd_update", wraps=optim.sgd_update) as sgd:
        fused_after = train(b, fused, data)
    assert sgd.call_args_list and all(c.kwargs.get("fused") for c in sgd.call_args_list)
    assert_same_updates(train(a, default, data), fused_after, rtol=1e-5, atol=1e-6)


def test_compiled_newton_schulz_updates_like_the_eager_default():
    """CUDA's compiled Newton-Schulz, forced on a CPU (the test prints the compile time: 3-10 s on a
    2-core AMD EPYC, 10 s with a cold inductor cache). Each step starts both nets from the eager one's
    params and momentum, so each update is compared alone: the filters' to lr x 1.5e-2 where the chain
    runs in bf16 (this CPU: compiled and eager kernels round bf16 differently; the orthogonalised update
    is ~1 an entry; seen: lr x 1e-2), else lr x 1e-4; the SGD part, which Newton-Schulz does not touch,
    to fp32 rounding."""
    a, b = twin(whitened_net)
    default = create_optimizer(a, "muon", 0.05, 5e-4, 0.85)
    compiled = create_optimizer(b, "muon", 0.05, 5e-4, 0.85, compile_ns=True)
    optim._compiled_newton_schulz = None
    muon = {n for n, p in a.named_parameters() if p.ndim == 4 and p.requires_grad and n != "stem.0.weight"}
    lr = default.param_groups[-1]["lr"]
    tol = lr * (1.5e-2 if default.ns_dtype == torch.bfloat16 else 1e-4)
    for step, batch in enumerate(batches()):
        started = time.perf_counter()
        (pb,) = train(b, compiled, [batch])
        if step == 0:
            print(f"compiling Newton-Schulz on this CPU: {time.perf_counter() - started:.1f} s (with the first step)")
            assert optim._compiled_newton_schulz is not None
        (pa,) = train(a, default, [batch])
        for name in pa:
            rtol, atol = (0, tol) if name in muon else (1e-6, 1e-7)
            assert_close(pb[name], pa[name], rtol, atol, f"step {step} {name}")
        b.load_state_dict(a.state_dict())  # the next step from the same point
        for p, q in zip(a.parameters(), b.parameters()):
            if "momentum_buffer" in default.state.get(p, {}):
                compiled.state[q]["momentum_buffer"].copy_(default.state[p]["momentum_buffer"])


def test_gpu_only_compile_modes_pass_through_when_forced():
    said = []
    with mock.patch("torch.compile", side_effect=lambda model, mode: (model, mode)):
        for mode in ("max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"):
            assert training.compile_model("net", mode, torch.device("cpu"), said.append, gpu_modes=True) == \
                ("net", mode)
        assert training.compile_model("net", "reduce-overhead", torch.device("cpu"), said.append) == ("net", "default")
    assert len(said) == 1


# 2. fp16's GradScaler with MuonSGD: no read-back per step, and a step with an inf changes nothing.

def scaled_step(model, opt, scaler, x, y, inf_in: torch.Tensor | None = None) -> None:
    opt.zero_grad(set_to_none=True)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if inf_in is not None:
        inf_in.grad.view(-1)[0] = float("inf")
    scaler.step(opt)
    scaler.update()


def muon_state(model, opt) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out |= {f"{n}.momentum": opt.state[p]["momentum_buffer"].clone()
            for n, p in model.named_parameters() if "momentum_buffer" in opt.state.get(p, {})}
    return out


@pytest.mark.parametrize("branches", [{}, {"fused": True, "compile_ns": True}], ids=["cpu", "cuda-branches"])
def test_muon_under_a_grad_scaler_reads_nothing_back_and_skips_a_step_with_an_inf(branches):
    """cuda-branches: what fp16 on a GPU runs (fused SGD part, compiled Newton-Schulz), forced on a CPU."""
    a, b = twin(whitened_net)
    plain = create_optimizer(a, "muon", 0.05, 5e-4, 0.85, norm_bias_lr_scale=64, **branches)
    amp = create_optimizer(b, "muon", 0.05, 5e-4, 0.85, norm_bias_lr_scale=64, **branches)
    # A power-of-two scale: the scaled grads unscale exactly, so the updates equal the plain ones.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    data = batches(4)
    filters = next(p for n, p in b.named_parameters() if p.ndim == 4 and n != "stem.0.weight")
    reads = Counter()
    for step, (x, y) in enumerate(data):
        inf = step == 2
        before = muon_state(b, amp)
        with counting_read_backs(reads) if step else contextlib.nullcontext():  # the first: state created
            scaled_step(b, amp, scaler, x, y, inf_in=filters if inf else None)
        if inf:  # skipped: params and momentum as they were, the scale backed off
            after = muon_state(b, amp)
            assert after.keys() == before.keys()
            assert all(torch.equal(after[k], before[k]) for k in before)
            assert scaler.get_scale() == 2.0 ** 11
            continue
        train(a, plain, [(x, y)])
        assert_same_updates([muon_state(a, plain)], [muon_state(b, amp)], rtol=0, atol=0)
    assert sum(reads.values()) == 0, reads


def test_muons_amp_path_skips_a_first_step_with_an_inf_and_starts_cleanly_after():
    a, b = twin(whitened_net)
    plain = create_optimizer(a, "muon", 0.05, 5e-4, 0.85)
    amp = create_optimizer(b, "muon", 0.05, 5e-4, 0.85)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    (x, y), (x2, y2) = batches(2)
    before = muon_state(b, amp)
    scaled_step(b, amp, scaler, x, y, inf_in=next(p for p in b.parameters() if p.ndim == 1))  # an SGD param
    after = muon_state(b, amp)
    assert all(torch.equal(after[k], before[k]) for k in before)
    scaled_step(b, amp, scaler, x2, y2)
    train(a, plain, [(x2, y2)])
    assert_same_updates([muon_state(a, plain)], [muon_state(b, amp)], rtol=0, atol=0)


def test_muons_amp_path_after_an_explicit_unscale():
    """unscale_ first (gradient clipping does): GradScaler then passes no grad_scale, only found_inf."""
    a, b = twin(whitened_net)
    plain, amp = create_optimizer(a, "muon", 0.05, 5e-4), create_optimizer(b, "muon", 0.05, 5e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    (x, y), = batches(1)
    scaler.scale(F.cross_entropy(b(x), y)).backward()
    scaler.unscale_(amp)
    scaler.step(amp)
    scaler.update()
    train(a, plain, [(x, y)])
    assert_same_updates([muon_state(a, plain)], [muon_state(b, amp)], rtol=0, atol=0)


def test_lookahead_around_muon_reads_nothing_back_and_skips_a_step_with_an_inf():
    """The suite's Lookahead forwards GradScaler's protocol to MuonSGD: no found_inf read-back a step; a step
    with an inf leaves the fast and slow weights as they were (k=2: the step with the inf is a sync step)."""
    from resnet.techniques.lookahead import lookahead_class

    model = whitened_net()
    opt = lookahead_class()(create_optimizer(model, "muon", 0.05, 5e-4), alpha=0.5, k=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    data = batches(4)
    scaled_step(model, opt, scaler, *data[0])
    reads = Counter()
    with counting_read_backs(reads):
        scaled_step(model, opt, scaler, *data[1])  # a sync step
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        slow = {n: opt._base_optimizer.state[p]["lookahead_slow_buff"].clone() for n, p in model.named_parameters()
                if "lookahead_slow_buff" in opt._base_optimizer.state[p]}
        scaled_step(model, opt, scaler, *data[2])
        filters = next(p for p in model.parameters() if p.ndim == 4 and p.requires_grad)
        scaled_step(model, opt, scaler, *data[3], inf_in=filters)  # the next sync step, skipped
    assert sum(reads.values()) == 0, reads
    assert slow and scaler.get_scale() == 2.0 ** 11
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    # The step with the inf kept the weights of the step before it; compare with a plain run of 3 steps.
    plain = whitened_net()
    plain_opt = lookahead_class()(create_optimizer(plain, "muon", 0.05, 5e-4), alpha=0.5, k=2)
    plain_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for x, y in data[:3]:
        scaled_step(plain, plain_opt, plain_scaler, x, y)
    for n, p in plain.named_parameters():
        torch.testing.assert_close(moved[n], p.detach(), rtol=0, atol=0, msg=n)
    assert any(not torch.equal(before[n], moved[n]) for n in before)  # the step before it did move them
