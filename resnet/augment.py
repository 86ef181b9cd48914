"""Batched augmentation on tensors, one independent random draw per image, on any device.

Each function takes a float batch (N, C, H, W) in 0..1 and a ``torch.Generator`` on the batch's
device, and returns a batch of the same shape, dtype and device. Doing this on whole batches is what
lets the dataset live on the accelerator with no DataLoader workers (airbench's ``batch_flip_lr`` /
``batch_crop`` idea, extended to every augmentation of the course report).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def _chance(n: int, p: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Bool (n,) mask, True with probability p."""
    return torch.rand(n, generator=gen, device=device) < p


def _per_image(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, 1, 1, 1)


def batch_flip(x: torch.Tensor, p: float, gen: torch.Generator, dim: int = -1) -> torch.Tensor:
    """Flip each image along ``dim`` (-1 horizontal, -2 vertical) with probability p."""
    if p <= 0:
        return x
    return torch.where(_per_image(_chance(len(x), p, gen, x.device)), x.flip(dim), x)


def alternating_flip_half(n: int, seed: int) -> torch.Tensor:
    """The fixed random half of ``batch_alternating_flip``: (n,) bool on the CPU, one coin per image, from ``seed``."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5


def batch_alternating_flip(x: torch.Tensor, half: torch.Tensor, epoch: int) -> torch.Tensor:
    """airbench's every-other-epoch flip: mirror the images whose fixed coin ``half`` (N,) is set on even
    epochs and the others on odd epochs.

    Each image is then seen both ways in any two consecutive epochs, where an independent coin per epoch
    shows half of them the same way twice: more distinct views in a short run. ``half`` must follow the
    image: index the run's coins (``alternating_flip_half``) with the batch's dataset indices.
    """
    return torch.where(_per_image(half.to(x.device) ^ bool(epoch % 2)), x.flip(-1), x)


def batch_translate(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels per axis: reflect-pad, then crop at a random offset."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=gen, device=x.device)
    # Gather each image's window in one indexing op per axis (no Python loop over the batch).
    rows = (_positions(h, -2, x.device) + dy).expand(n, c, h, padded.shape[-1])
    out = padded.gather(2, rows)
    return out.gather(3, (_positions(w, -1, x.device) + dx).expand(n, c, h, w))


@functools.lru_cache(maxsize=16)
def _positions(size: int, dim: int, device: torch.device) -> torch.Tensor:
    """0..size-1 along ``dim`` of a 4-D shape, made once per device: every tensor op costs the host time."""
    shape = [1, 1, 1, 1]
    shape[dim] = size
    return torch.arange(size, device=device).view(shape)


def batch_affine(
    x: torch.Tensor,
    gen: torch.Generator,
    crop_scale: float = 1.0,
    crop_ratio: float = 0.75,
    rotation: float = 0.0,
    hflip: float = 0.0,
    vflip: float = 0.0,
) -> torch.Tensor:
    """Random resized crop, rotation and flips as one affine warp per image.

    ``crop_scale`` is the smallest area fraction kept (1 = no crop); the aspect ratio is log-uniform
    in [crop_ratio, 1/crop_ratio]; ``rotation`` in degrees. One bilinear ``grid_sample`` does all of
    it, so stacking transforms costs no extra resampling blur. Translation is not folded in: the warp
    can only pad with zeros, and --translate pads by reflection (``batch_translate``) on every path.
    """
    n = len(x)
    dev = x.device
    area = _uniform(n, crop_scale, 1.0, gen, dev)
    log_r = math.log(crop_ratio) if crop_scale < 1 else 0.0  # scale 1 = no crop, whatever the ratio
    ratio = torch.exp(_uniform(n, log_r, -log_r, gen, dev))
    # Crop size as a fraction of the image side; clamp so the window stays inside the image.
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    # Window centre in normalised coordinates [-1, 1], anywhere the window still fits.
    cx = _uniform(n, -1.0, 1.0, gen, dev) * (1 - sx)
    cy = _uniform(n, -1.0, 1.0, gen, dev) * (1 - sy)
    angle = _uniform(n, -rotation, rotation, gen, dev) * (math.pi / 180)
    fx = torch.where(_chance(n, hflip, gen, dev), -1.0, 1.0)
    fy = torch.where(_chance(n, vflip, gen, dev), -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # input = centre + R(angle) @ diag(sx*fx, sy*fy) @ output
    theta = torch.stack([
        torch.stack([cos * sx * fx, -sin * sy * fy, cx], dim=1),
        torch.stack([sin * sx * fx, cos * sy * fy, cy], dim=1),
    ], dim=1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# Luma weights of torchvision's rgb_to_grayscale on float tensors (ITU-R 601, as torchvision rounds them).
_LUMA = (0.2989, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    # Three fused ops rather than five: the jitter computes this up to six times per batch.
    return (_LUMA[0] * r).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def batch_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Turn each image's HSV hue by ``shift`` (N,) turns, as torchvision's ``adjust_hue`` does.

    RGB -> (hue, chroma, value) -> RGB with the maths of torchvision's ``_rgb2hsv`` / ``_hsv2rgb``, in a
    fused form: saturation only ever appears as chroma = s * v, so it is never formed, and the way back
    is the closed form channel = v - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6 * hue) mod 6 with
    n = 5, 3, 1 for R, G, B, instead of building six candidate images.
    """
    r, g, b = x.unbind(1)
    value = x.amax(1)
    chroma = value - x.amin(1)
    c = torch.where(chroma == 0, 1.0, chroma)  # grays have no hue; chroma 0 erases whatever comes out
    # Hue in sixths of a turn, from the largest channel (red wins ties, then green), as torchvision.
    h6 = torch.where(value == r, (g - b) / c, torch.where(value == g, (b - r) / c + 2.0, (r - g) / c + 4.0))
    h6 = (h6 + 6.0 * shift.view(-1, 1, 1)).unsqueeze(1)
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1; no host copy
    k = torch.remainder(h6 + n, 6.0)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


# Operation ids of the colour jitter, in torchvision's numbering (ColorJitter.get_params' fn_idx).
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def color_jitter_params(
    n: int,
    gen: torch.Generator,
    device: torch.device,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
    p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random draws of ``batch_color_jitter``: per image, what torchvision's ColorJitter draws per call.

    Returns ``order`` (n, 4) long, a random permutation of the op ids per image; ``factors`` (n, 4) float
    indexed by op id (brightness/contrast/saturation factors in [max(0, 1-s), 1+s], hue shift in
    [-hue, hue] turns; an op at strength 0 gets the identity, 1 or 0); ``apply`` (n,) bool, prob. p.
    """
    apply = _chance(n, p, gen, device)
    # argsort of i.i.d. uniforms is a uniformly random permutation, one per row.
    order = torch.rand(n, 4, generator=gen, device=device).argsort(1)
    factors = torch.stack([
        _uniform(n, max(0.0, 1 - s), 1 + s, gen, device) for s in (brightness, contrast, saturation)
    ] + [_uniform(n, -hue, hue, gen, device)], 1)
    return order, factors, apply


def _blend_ops(x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast or saturation (per image ``op``) where ``active``, each clamped as torchvision's _blend.

    The three are one blend, out = f * x + (1 - f) * degenerate, with a different degenerate image:
    black, the mean of the image's grayscale, the image's own grayscale.
    """
    f = _per_image(factors.gather(1, op[:, None]).squeeze(1))
    gray = _gray(x)
    degenerate = torch.where(_per_image(op == SATURATION), gray, gray.mean(dim=(1, 2, 3), keepdim=True))
    degenerate = torch.where(_per_image(op == BRIGHTNESS), 0.0, degenerate)
    return torch.where(_per_image(active), torch.lerp(degenerate, x, f).clamp_(0.0, 1.0), x)


def batch_color_jitter(
    x: torch.Tensor,
    gen: torch.Generator,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
    p: float = 1.0,
) -> torch.Tensor:
    """torchvision's ``RandomApply([ColorJitter(b, c, s, hue)], p)``, per image, on a whole batch.

    As torchvision: each image applies the four ops in its own random order, each op clamps to [0, 1]
    right after it (``_blend`` does), contrast blends with the mean of the image's grayscale, and hue
    turns the HSV hue. Ops at strength 0 are skipped, as torchvision skips them (factor None).
    Batched with masks, no loop over images and no host sync: the blends of each order position that
    come before an image's hue, then the hue once for all, then the blends that come after it (hue is
    the costly op, so it runs once rather than at each of the four positions).
    """
    enabled = (brightness > 0, contrast > 0, saturation > 0, hue > 0)
    if not any(enabled) or p <= 0:
        return x
    order, factors, apply = color_jitter_params(len(x), gen, x.device, brightness, contrast, saturation, hue, p)
    factors = factors.to(x.dtype)
    active = apply[:, None].expand(-1, 4)  # (n, 4): per image and order position
    for op, on in enumerate(enabled):
        if not on:  # compared on the device: a host-built mask copied in would make CUDA wait for the GPU
            active = active & (order != op)
    hue_at = order.argsort(1)[:, HUE] if hue else torch.full_like(apply, 4, dtype=torch.long)
    blends = any(enabled[:HUE])
    out = x
    for k in range(3 if hue else 4) if blends else ():  # hue is at position 3 at the latest
        out = _blend_ops(out, order[:, k], factors, active[:, k] & (k < hue_at))
    if hue:
        out = torch.where(_per_image(apply), batch_hue(out, factors[:, HUE]), out)
        for k in range(1, 4) if blends else ():
            out = _blend_ops(out, order[:, k], factors, active[:, k] & (k > hue_at))
    return out


def batch_gaussian_blur(x: torch.Tensor, sigma_max: float, gen: torch.Generator, p: float = 1.0,
                        sigma_min: float = 0.1) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma in [sigma_min, sigma_max], applied with prob. p."""
    if sigma_max <= 0:
        return x
    n, c, h, w = x.shape
    dev = x.device
    radius = min(math.ceil(3 * sigma_max), (min(h, w) - 1) // 2)
    sigma = _uniform(n, sigma_min, max(sigma_min, sigma_max), gen, dev)
    taps = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None].to(x.dtype)) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)
    # Images not chosen get a delta kernel, so the whole batch still goes through one conv.
    delta = (taps == 0).to(x.dtype).expand(n, -1)
    kernel = torch.where(_chance(n, p, gen, dev)[:, None], kernel, delta)
    kernel = kernel.repeat_interleave(c, dim=0)  # one kernel per (image, channel) group
    k = 2 * radius + 1
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, k), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(n * c, 1, k, 1), groups=n * c)
    return flat.view(n, c, h, w)


def batch_cutout(x: torch.Tensor, size: int, gen: torch.Generator, p: float = 1.0,
                 fill: float = 0.0) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square per image, centred anywhere (it may hang over the edge)."""
    if size <= 0 or p <= 0:
        return x
    n, _, h, w = x.shape
    dev = x.device
    cy = torch.randint(0, h, (n,), generator=gen, device=dev)
    cx = torch.randint(0, w, (n,), generator=gen, device=dev)
    top, left = (cy - size // 2)[:, None], (cx - size // 2)[:, None]
    ys, xs = torch.arange(h, device=dev)[None], torch.arange(w, device=dev)[None]
    in_rows = (ys >= top) & (ys < top + size)  # (n, h)
    in_cols = (xs >= left) & (xs < left + size)  # (n, w)
    mask = (in_rows[:, :, None] & in_cols[:, None, :]) & _chance(n, p, gen, dev)[:, None, None]
    return x.masked_fill(mask[:, None], fill)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    shift, scale = _channel_stats(tuple(mean), tuple(std), x.device, x.dtype)
    return (x - shift) / scale


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple, std: tuple, device: torch.device, dtype: torch.dtype) -> tuple:
    """(mean, std) as (1, C, 1, 1) tensors on ``device``, made once: a copy to a GPU from the host each
    batch would cost host time (torch.tensor(..., device="cuda") even waits for the queued work)."""
    stats = torch.tensor([mean, std], dtype=dtype).view(2, 1, -1, 1, 1).to(device)
    return stats[0], stats[1]


@dataclass
class AugmentConfig:
    """Strengths of the batched pipeline; every field at 0 (or scale 1) leaves images untouched."""

    crop_scale: float = 1.0  # smallest area fraction of random resized crop (1 = off)
    crop_ratio: float = 0.75  # aspect ratio range [r, 1/r]
    translate: int = 0  # pixels
    hflip: float = 0.0  # probability
    vflip: float = 0.0  # probability
    rotation: float = 0.0  # degrees
    color_jitter: float = 0.0  # brightness/contrast/saturation strength
    hue: float = 0.0  # turns
    jitter_p: float = 1.0
    blur_sigma: float = 0.0  # pixels
    blur_p: float = 1.0
    cutout: int = 0  # square side in pixels
    cutout_p: float = 1.0

    @property
    def needs_warp(self) -> bool:
        return self.crop_scale < 1.0 or self.rotation > 0


class BatchAugment:
    """uint8 (N,3,H,W) batch in, normalised float batch out: warp, colour, blur, normalise, cutout."""

    def __init__(self, cfg: AugmentConfig, mean: tuple[float, ...], std: tuple[float, ...]):
        self.cfg, self.mean, self.std = cfg, mean, std

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        c = self.cfg
        x = images.float().div_(255)
        if c.needs_warp:
            x = batch_affine(x, gen, c.crop_scale, c.crop_ratio, c.rotation, c.hflip, c.vflip)
        else:  # cheaper exact paths when no resampling is needed
            x = batch_flip(x, c.hflip, gen, dim=-1)
            x = batch_flip(x, c.vflip, gen, dim=-2)
        # After the warp, so the pixels shifted in are reflections, as the worker path's RandomCrop pads.
        x = batch_translate(x, c.translate, gen)
        if c.color_jitter or c.hue:
            x = batch_color_jitter(x, gen, c.color_jitter, c.color_jitter, c.color_jitter, c.hue, c.jitter_p)
        x = batch_gaussian_blur(x, c.blur_sigma, gen, c.blur_p)
        x = normalize(x, self.mean, self.std)
        # After normalising, a zero fill is the dataset mean colour (as in the cutout paper).
        return batch_cutout(x, c.cutout, gen, c.cutout_p)
