"""Optimizers (no weight decay on norms and biases), lr schedules as functions of the step, airbench's
Muon-plus-SGD optimizer and its lookahead-EMA (the EMA of the weights: ema.py).

timm is imported where it is used, not here: it takes ~4 s to import (torchvision and torch._dynamo with
it), and every process of the suite and its tests imports this module."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.sgd import sgd as sgd_update

from .hardware import cpu_has_native_bf16
from .models import WhiteningConv

# Per-optimizer defaults used when --lr / --weight-decay are not given (for muon: its SGD part).
DEFAULT_LR = {"sgd": 0.1, "nesterov": 0.1, "adam": 1e-3, "adamw": 2e-3, "muon": 0.1}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "nesterov": 5e-4, "adam": 0.0, "adamw": 0.05, "muon": 5e-4}


def per_1024_images(value: float, global_batch: int) -> float:
    """A learning rate given per 1024 images as the optimizer's lr at ``global_batch`` (x global_batch / 1024).

    With coupled decay (SGD) and decoupled decay as torch's AdamW applies it (lr x wd per step) the
    shrink per step grows the same way, so the decay per image also stays fixed: the batch size can
    change without retuning either. airbench states lr and wd per 1024 images for this reason. Linear
    in the batch is SGD's rule; for Adam(W) a square root is the more usual one.
    """
    return value * global_batch / 1024


def _norm_biases(model: nn.Module) -> set[int]:
    return {id(m.bias) for m in model.modules()
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) and m.bias is not None}


def _whitening_biases(model: nn.Module) -> set[int]:
    return {id(m.bias) for m in model.modules() if isinstance(m, WhiteningConv) and m.bias is not None}


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None, norm_bias_lr_scale: float = 1.0,
                 whiten_bias_steps: int | None = None) -> list[dict]:
    """Decay conv/linear weights only: decaying BN scales and biases hurts accuracy and buys nothing.

    The first two groups are always (decayed weights, the rest). Further groups appear when asked for:
    norm biases at lr x ``norm_bias_lr_scale`` (airbench: 64; it freezes the BN scales, so the biases
    are all that trains there); the whitening stem's bias, trained for ``whiten_bias_steps`` updates
    (``train_steps``, read by ``StepSchedule``). ``muon_groups`` splits Muon's filters off the first.
    Frozen parameters (``requires_grad`` False) are in no group.
    """
    norm_biases, whiten_biases = _norm_biases(model), _whitening_biases(model)
    base = {} if lr is None else {"lr": lr}
    decay, plain, norm, whiten = [], [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in whiten_biases and whiten_bias_steps is not None:
            whiten.append(p)
        elif id(p) in norm_biases and norm_bias_lr_scale != 1.0:
            norm.append(p)
        else:
            (plain if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, **base}, {"params": plain, "weight_decay": 0.0, **base}]
    if norm:
        if lr is None:
            raise ValueError("param_groups: norm_bias_lr_scale needs the base lr")
        groups.append({"params": norm, "weight_decay": 0.0, "lr": lr * norm_bias_lr_scale})
    if whiten:
        groups.append({"params": whiten, "weight_decay": 0.0, **base, "train_steps": whiten_bias_steps})
    return groups


def _input_conv_weights(model: nn.Module, image_channels: int = 3) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == image_channels}


def muon_groups(model: nn.Module, groups: list[dict], muon_lr: float) -> list[dict]:
    """``groups`` (``param_groups``'s) with every hidden conv filter bank moved from the decayed weights
    into a last group marked ``muon``, at ``muon_lr``.

    Hidden layers only, as Muon's authors and airbench94_muon have it: the head (2-D) and a trainable conv
    reading the image (3 input channels; the frozen whitening filters are in no group) stay with SGD.
    """
    inputs = _input_conv_weights(model)
    decay, *rest = groups
    filters = [p for p in decay["params"] if p.ndim == 4 and id(p) not in inputs]
    if not filters:
        return groups
    hidden = set(map(id, filters))
    kept = {**decay, "params": [p for p in decay["params"] if id(p) not in hidden]}
    return [kept, *rest, {"params": filters, "weight_decay": 0.0, "lr": muon_lr, "muon": True}]


# Keller Jordan's quintic Newton-Schulz coefficients (timm's "original"; airbench94_muon's).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(stack: torch.Tensor, steps: int, dtype: torch.dtype, eps: float = 1e-7) -> torch.Tensor:
    """Orthogonalise every matrix of a (B, rows, cols) stack with rows <= cols: timm's
    ``zeropower_via_newtonschulz`` (Frobenius-normalised, then ``steps`` quintic iterations in ``dtype``),
    as one chain of batched matmuls for the whole stack."""
    a, b, c = NS_COEFFICIENTS
    x = stack.to(dtype)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    return x


_compiled_newton_schulz = None


class FilterStack:
    """One (filters, rows, cols) tensor holding every filter bank's (out, in*kh*kw) matrix, each turned wide
    (rows <= cols, as timm transposes a tall one) and zero-padded to the largest, with views of it shaped
    like the filters. Muon writes its updates through the views, orthogonalises the whole stack in one
    batched chain and reads the results back through them: a few foreach ops per step whatever the
    number of filters. Zero rows and columns stay exactly zero through Newton-Schulz and change no norm,
    so each filter's result is its own matrix's; the padding costs FLOPs only (nothing on a GPU next to
    the ~25 kernel launches each filter's own chain would cost).
    """

    def __init__(self, filters: list[torch.Tensor], compile_ns: bool | None = None):
        self.compile_ns = compile_ns  # None: compiled on CUDA only (``orthogonalise``)
        mats = [(len(f), f[0].numel()) for f in filters]
        self.tall = [r > c for r, c in mats]
        wide = [(c, r) if t else (r, c) for (r, c), t in zip(mats, self.tall)]
        rows, cols = max(r for r, _ in wide), max(c for _, c in wide)
        self.stack = filters[0].new_zeros(len(filters), rows, cols)
        self.views = [self._view(self.stack, i, f) for i, f in enumerate(filters)]

    def _view(self, stack: torch.Tensor, i: int, f: torch.Tensor) -> torch.Tensor:
        r, c = len(f), f[0].numel()
        block = stack[i, :c, :r].mT if self.tall[i] else stack[i, :r, :c]
        return block.view(f.shape)

    def orthogonalise(self, steps: int, dtype: torch.dtype) -> None:
        """Newton-Schulz on the whole stack, in place: compiled when ``compile_ns`` says so, by default on CUDA
        only, as airbench94_muon does. torch.compile runs on a CPU too (tests/test_gpu_branches.py forces it),
        but there it costs 1-10 s of compiling and gains nothing: 62 ms compiled, 61 ms eager for
        resnet_airbench_whiten_2m's (6, 256, 2304) bf16 stack on one core of a 2-core AMD EPYC."""
        global _compiled_newton_schulz
        orthogonalise = newton_schulz
        if self.stack.is_cuda if self.compile_ns is None else self.compile_ns:
            if _compiled_newton_schulz is None:
                _compiled_newton_schulz = torch.compile(newton_schulz, dynamic=False)
            orthogonalise = _compiled_newton_schulz
        self.stack.copy_(orthogonalise(self.stack, steps, dtype))


class MuonSGD(torch.optim.Optimizer):
    """airbench94_muon's optimizer as one torch optimizer: Muon on the groups marked ``muon``, Nesterov
    SGD (PyTorch's update rule, coupled weight decay) on the others.

    A Muon group's Nesterov momentum updates are orthogonalised as (out, in*kh*kw) matrices by
    Newton-Schulz (3 steps of Keller Jordan's original coefficients, no shape-based lr adjustment, as
    airbench), all filters in one batched chain (``FilterStack``); before each update every
    filter bank is rescaled to Frobenius norm sqrt(out channels), as airbench does in place of weight
    decay (a BatchNorm follows each conv, so the scale of the filters changes nothing but the effective
    step size). Every per-tensor step is a foreach op: on a GPU each op costs the host a few microseconds.
    The chain runs in bf16 where the device computes it natively, else in fp32. One optimizer, so the
    loop, the schedule, Accelerate and checkpoints treat it like any other.

    ``fused``: the SGD part's update as torch's fused kernel (else foreach). ``compile_ns``: Newton-Schulz
    compiled (None: on CUDA only). Under fp16's GradScaler it takes the scale and the inf flag on the
    device (``_step_supports_amp_scaling``): no value is read back to the host (``_amp_step``).
    """

    # GradScaler.step then sets ``grad_scale`` (None when unscale_ already ran) and ``found_inf`` on the
    # optimizer and always calls step(), instead of reading found_inf back with .item() to decide.
    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float, momentum: float = 0.85, muon_momentum: float = 0.6, ns_steps: int = 3,
                 ns_dtype: torch.dtype = torch.bfloat16, fused: bool = False, compile_ns: bool | None = None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=0.0, nesterov=True, muon=False))
        self.ns_dtype, self._fused, self.compile_ns = ns_dtype, fused, compile_ns
        self._stacks: dict[tuple, FilterStack] = {}  # per set of filters: scratch space, not state
        for group in self.param_groups:
            if group["muon"]:
                group.setdefault("muon_momentum", muon_momentum)
                group.setdefault("ns_steps", ns_steps)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        todo = [(g, params) for g, params in todo if params]
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if grad_scale is None and found_inf is None:
            self._update(todo)
        else:
            self._amp_step(todo, grad_scale, found_inf)
        return loss

    def _update(self, todo: list[tuple[dict, list[torch.Tensor]]]) -> None:
        for group, params in todo:
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            if group["muon"]:
                self._muon_step(group, params, bufs)
            else:
                kind = {"fused": True} if self._fused else {"foreach": True}
                sgd_update(params, [p.grad for p in params], bufs, weight_decay=group["weight_decay"],
                           momentum=group["momentum"], lr=group["lr"], dampening=0.0,
                           nesterov=group["nesterov"], maximize=False, **kind)
            for p, buf in zip(params, bufs):  # created on the first step
                self.state[p]["momentum_buffer"] = buf

    def _amp_step(self, todo: list, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        """The update of unscaled grads, or none at all (params and momentum unchanged) when ``found_inf``
        is set, decided on the device: the grads are divided by ``grad_scale`` (as GradScaler.unscale_
        does: x its fp32 reciprocal, computed in fp64), non-finite values zeroed (the update stays finite,
        and equals the plain one when there were none), the update applied, and then the params and
        momentum buffers set to keep x new + found x old, exact for keep, found in {0, 1}.

        The fp16 path only (GradScaler); costs a copy of the params and buffers and one op per grad
        (nan_to_num_: there is no foreach form), against a read-back that stalls the host every step.
        A buffer not yet created starts at zero: with dampening 0, zero x momentum + grad is the
        gradient exactly, torch's first step, and a skipped first step leaves it at zero.
        """
        grads = [p.grad for _, params in todo for p in params]
        if grad_scale is not None:
            torch._foreach_mul_(grads, grad_scale.double().reciprocal().float())
        if found_inf is None:
            return self._update(todo)
        for g in grads:
            g.nan_to_num_(0.0, 0.0, 0.0)
        for _, params in todo:
            for p in params:
                if self.state[p].get("momentum_buffer") is None:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        live = [t for _, params in todo for p in params for t in (p, self.state[p]["momentum_buffer"])]
        old = torch._foreach_mul(live, 1.0)  # copies
        self._update(todo)
        found = found_inf.clamp(0, 1)  # GradScaler adds the flags of all devices
        torch._foreach_mul_(live, 1 - found)
        torch._foreach_mul_(old, found)
        torch._foreach_add_(live, old)

    def _muon_step(self, group: dict, params: list[torch.Tensor], bufs: list) -> None:
        norms = torch._foreach_norm(params)  # each filter bank to Frobenius norm sqrt(out channels)
        torch._foreach_clamp_min_(norms, 1e-12)
        torch._foreach_reciprocal_(norms)
        torch._foreach_mul_(norms, [len(p) ** 0.5 for p in params])
        torch._foreach_mul_(params, norms)
        for i, p in enumerate(params):
            if bufs[i] is None:
                bufs[i] = torch.zeros_like(p)
        grads, m = [p.grad for p in params], group["muon_momentum"]
        torch._foreach_lerp_(bufs, grads, 1 - m)
        filters = self._stacks.get(tuple(map(id, params)))
        if filters is None:  # built once: the views follow the stack, which is rewritten in place each step
            filters = self._stacks[tuple(map(id, params))] = FilterStack(params, self.compile_ns)
        torch._foreach_copy_(filters.views, grads)
        torch._foreach_lerp_(filters.views, bufs, m)  # Nesterov: the gradient moved towards the new momentum
        filters.orthogonalise(group["ns_steps"], self.ns_dtype)
        torch._foreach_add_(params, filters.views, alpha=-group["lr"])


def create_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                     norm_bias_lr_scale: float = 1.0, whiten_bias_steps: int | None = None,
                     muon_lr: float = 0.24, muon_momentum: float = 0.6, fused: bool | None = None,
                     compile_ns: bool | None = None) -> torch.optim.Optimizer:
    """The named optimizer over ``param_groups(model, ...)``; ``muon_lr`` / ``muon_momentum`` only for 'muon'
    (``muon_groups``).

    ``fused``: torch's fused kernels (for muon: its SGD part), else foreach ops; None: fused on CUDA (one
    kernel per update), foreach elsewhere (a handful of ops, not a few per tensor; the speed the CPU runs
    were measured at). ``compile_ns``: muon's Newton-Schulz compiled; None: on CUDA only. Both run on a
    CPU when forced, which is how the tests cover the branches a GPU takes.
    """
    groups = param_groups(model, weight_decay, lr, norm_bias_lr_scale, whiten_bias_steps)
    if name == "muon":
        groups = muon_groups(model, groups, muon_lr)
    cuda = next(model.parameters()).is_cuda
    fused = cuda if fused is None else fused
    kind = {"fused": True} if fused else {"foreach": True}
    if name in ("sgd", "nesterov"):
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=name == "nesterov", **kind)
    elif name == "adam":
        opt = torch.optim.Adam(groups, lr=lr, **kind)
    elif name == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, **kind)
    elif name == "muon":
        native_bf16 = cuda or cpu_has_native_bf16()
        opt = MuonSGD(groups, lr=lr, momentum=momentum, muon_momentum=muon_momentum, fused=fused,
                      compile_ns=compile_ns, ns_dtype=torch.bfloat16 if native_bf16 else torch.float32)
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(DEFAULT_LR)}")
    return opt


class StepSchedule:
    """Every param group's lr = (its lr when the schedule was built) x ``factor(step)``.

    cosine: linear warm-up from ``warmup_lr_ratio`` to 1 over ``warmup_steps``, then cosine down to
    ``min_lr_ratio`` at ``total_steps`` (timm's CosineLRScheduler, but relative per group, so a group
    at 64x the lr warms up and decays at 64x). linear: the same warm-up, then a straight line down to
    ``min_lr_ratio`` at ``total_steps`` (airbench94: 0.2 -> 1 over the first 23% of training, -> 0.07).
    A group with ``train_steps`` gets lr 0 from that step on (the whitening bias), which stops it
    exactly, momentum and weight decay included. The schedule stores no position: the caller calls
    ``step_update(global_step)`` after every update and after a resume.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, warmup_lr_ratio: float,
                 min_lr_ratio: float, kind: str = "cosine"):
        if kind not in ("cosine", "linear"):
            raise ValueError(f"unknown schedule {kind!r}; expected 'cosine' or 'linear'")
        self.optimizer, self.kind = optimizer, kind
        self.total, self.warmup = max(total_steps, 1), max(warmup_steps, 0)
        self.start, self.floor = warmup_lr_ratio, min_lr_ratio
        # The lr a group had when the first schedule saw it (as timm and torch keep it): a schedule built
        # again, or before a resume loads the saved mid-schedule lrs, starts from the same peak.
        self.base = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.stops = [g.get("train_steps") for g in optimizer.param_groups]

    def factor(self, step: int) -> float:
        """The lr multiplier after ``step`` updates."""
        if step < self.warmup:
            return self.start + (1 - self.start) * step / self.warmup
        t, span = step - self.warmup, max(self.total - self.warmup, 1)
        if t >= span:
            return self.floor
        if self.kind == "linear":
            return 1 + (self.floor - 1) * t / span
        return self.floor + 0.5 * (1 - self.floor) * (1 + math.cos(math.pi * t / span))

    def lr_at(self, step: int, group: int = 0) -> float:
        """The lr of ``group``'s update number ``step`` (0-based)."""
        stop = self.stops[group]
        return 0.0 if stop is not None and step >= stop else self.base[group] * self.factor(step)

    def step_update(self, step: int) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lr_at(step, i)


def create_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, warmup_lr_ratio: float,
                     min_lr_ratio: float, kind: str = "cosine") -> StepSchedule:
    """``StepSchedule`` over ``total_steps`` optimizer updates, set to step 0."""
    scheduler = StepSchedule(optimizer, total_steps, warmup_steps, warmup_lr_ratio, min_lr_ratio, kind)
    scheduler.step_update(0)
    return scheduler


class LookaheadEMA:
    """airbench94's lookahead-EMA: every ``every`` updates after ``start_step``, the EMA moves toward the
    weights and the weights jump to the EMA; at the end of each epoch the weights are set to the EMA.

    The decay of an update at global step s is ``decay ** every * (s / total_steps) ** power``: it rises
    with training progress, so the weights move freely early and are averaged strongly at the end. The
    first due step only takes the copy. Every floating-point entry of the state dict takes part,
    BatchNorm running statistics included, as in airbench. Distinct from ``--lookahead`` (timm's
    Lookahead, a fixed alpha every k steps). Registered for checkpointing, so a resumed run continues
    with the same average.
    """

    def __init__(self, model: nn.Module, every: int, decay: float, power: float, start_step: int, total_steps: int):
        self.model, self.every, self.decay, self.power = model, every, decay, power
        self.start_step, self.total_steps = start_step, max(total_steps, 1)
        self.ema: dict[str, torch.Tensor] | None = None
        self._pairs: tuple[list, list] | None = None

    def _paired(self) -> tuple[list, list]:
        """(EMA tensors, the model's own), found once: keep_vars tensors follow every in-place change."""
        if self._pairs is None:
            live = self.model.state_dict(keep_vars=True)
            self._pairs = [self.ema[k] for k in self.ema], [live[k].data for k in self.ema]
        return self._pairs

    def rho(self, step: int) -> float:
        return self.decay ** self.every * (step / self.total_steps) ** self.power

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        """Call after every optimizer update, with the number of updates done so far."""
        if global_step <= self.start_step or global_step % self.every:
            return
        if self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items() if v.is_floating_point()}
            self._pairs = None
            return
        self._move(1 - self.rho(global_step))

    @torch.no_grad()
    def sync(self) -> None:
        """The weights become the EMA (airbench copies them back at the end of every epoch)."""
        if self.ema is not None:
            self._move(0.0)

    def _move(self, weight: float) -> None:
        emas, lives = self._paired()
        torch._foreach_lerp_(emas, lives, weight)
        torch._foreach_copy_(lives, emas)

    def state_dict(self) -> dict:
        return {"ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        ema = state.get("ema")
        live = self.model.state_dict()
        self.ema = None if ema is None else {k: v.to(live[k].device, live[k].dtype) for k, v in ema.items()}
        self._pairs = None
