"""Batched augmentations: shape/dtype/device kept, strength 0 is identity, seeded repeats, per-image draws."""
import pytest
import torch

from resnet.augment import (AugmentConfig, BatchAugment, batch_affine, batch_color_jitter, batch_cutout,
                            batch_flip, batch_gaussian_blur, batch_translate)


def images(n=64, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# Each augmentation at a real strength, and at strength 0.
CASES = {
    "hflip": (lambda x, g: batch_flip(x, 0.5, g), lambda x, g: batch_flip(x, 0.0, g)),
    "vflip": (lambda x, g: batch_flip(x, 0.5, g, dim=-2), lambda x, g: batch_flip(x, 0.0, g, dim=-2)),
    "translate": (lambda x, g: batch_translate(x, 4, g), lambda x, g: batch_translate(x, 0, g)),
    "crop": (lambda x, g: batch_affine(x, g, crop_scale=0.35), lambda x, g: batch_affine(x, g, crop_scale=1.0)),
    "rotation": (lambda x, g: batch_affine(x, g, rotation=30), lambda x, g: batch_affine(x, g, rotation=0)),
    "jitter": (lambda x, g: batch_color_jitter(x, g, 0.4, 0.4, 0.4, 0.1),
               lambda x, g: batch_color_jitter(x, g, 0, 0, 0, 0)),
    "blur": (lambda x, g: batch_gaussian_blur(x, 2.0, g), lambda x, g: batch_gaussian_blur(x, 0.0, g)),
    "cutout": (lambda x, g: batch_cutout(x, 8, g), lambda x, g: batch_cutout(x, 0, g)),
}


@pytest.mark.parametrize("name", CASES)
def test_shape_dtype_device_kept_and_seeded(name):
    on, _ = CASES[name]
    x = images()
    a, b = on(x, gen(1)), on(x, gen(1))
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, on(x, gen(2)))  # another seed, other draws
    assert not torch.equal(a, x)


@pytest.mark.parametrize("name", CASES)
def test_strength_zero_is_identity(name):
    _, off = CASES[name]
    x = images()
    torch.testing.assert_close(off(x, gen()), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["translate", "crop", "rotation", "jitter", "blur", "cutout"])
def test_each_image_gets_its_own_draw(name):
    """The same image repeated across a batch must come out different: no shared crop per batch."""
    on, _ = CASES[name]
    x = images(1).expand(32, -1, -1, -1).contiguous()
    out = on(x, gen(5))
    distinct = {tuple(o.flatten()[::97].tolist()) for o in out}
    assert len(distinct) > 16


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_flip_rate_matches_probability(p):
    x = images(4000, seed=3)
    out = batch_flip(x, p, gen(7))
    flipped = (out == x.flip(-1)).flatten(1).all(1).float().mean().item()
    assert abs(flipped - p) < 0.03


def test_affine_flip_only_is_an_exact_mirror():
    x = images(8)
    out = batch_affine(x, gen(), hflip=1.0)
    torch.testing.assert_close(out, x.flip(-1), atol=1e-5, rtol=0)
    out = batch_affine(x, gen(), vflip=1.0)
    torch.testing.assert_close(out, x.flip(-2), atol=1e-5, rtol=0)


def test_translate_moves_content_by_whole_pixels():
    x = images(16)
    out = batch_translate(x, 2, gen(4))
    for img, src in zip(out, x):
        # Each output equals a shifted window of the reflect-padded input.
        padded = torch.nn.functional.pad(src[None], (2, 2, 2, 2), mode="reflect")[0]
        assert any(torch.equal(img, padded[:, dy:dy + 32, dx:dx + 32]) for dy in range(5) for dx in range(5))


def test_warp_path_translation_pads_by_reflection():
    """With the warp on (a rotation too small to move anything), translated images are reflect-padded windows."""
    cfg = AugmentConfig(rotation=1e-3, translate=3)
    assert cfg.needs_warp
    x = (images(16) * 255).to(torch.uint8)
    out = BatchAugment(cfg, mean=(0.0,) * 3, std=(1.0,) * 3)(x, gen(4))
    shifted = 0
    for img, src in zip(out, x.float() / 255):
        padded = torch.nn.functional.pad(src[None], (3,) * 4, mode="reflect")[0]
        errors = {(dy, dx): (img - padded[:, dy:dy + 32, dx:dx + 32]).abs().max().item()
                  for dy in range(7) for dx in range(7)}
        (dy, dx), error = min(errors.items(), key=lambda kv: kv[1])
        assert error < 1e-3  # zero padding would leave black borders, a sub-pixel shift a blend
        shifted += (dy, dx) != (3, 3)
    assert shifted > 8


def test_cutout_zeroes_a_square_of_the_requested_size_and_rate():
    x = images(2000).add(1.0)  # no natural zeros
    out = batch_cutout(x, 8, gen(), p=0.5)
    zeros = (out == 0).all(1).flatten(1).sum(1)  # zeroed pixels per image
    hit = zeros > 0
    assert abs(hit.float().mean().item() - 0.5) < 0.04
    assert zeros.max().item() == 64  # a square fully inside covers 8x8
    assert (zeros[hit] <= 64).all()


def test_blur_keeps_the_mean_and_smooths():
    x = images(16)
    out = batch_gaussian_blur(x, 2.0, gen(), p=1.0, sigma_min=1.0)
    torch.testing.assert_close(out.mean(), x.mean(), atol=2e-3, rtol=0)
    assert out.diff(dim=-1).abs().mean() < 0.6 * x.diff(dim=-1).abs().mean()


def test_jitter_probability_and_range():
    x = images(2000)
    out = batch_color_jitter(x, gen(), brightness=0.5, p=0.3)
    changed = (out != x).flatten(1).any(1).float().mean().item()
    assert abs(changed - 0.3) < 0.04
    assert out.min() >= 0 and out.max() <= 1


def test_hue_rotation_keeps_gray_images_gray():
    gray = torch.rand(8, 1, 32, 32).expand(-1, 3, -1, -1).contiguous()
    out = batch_color_jitter(gray, gen(), hue=0.5)
    torch.testing.assert_close(out[:, 0], out[:, 1], atol=1e-4, rtol=0)


def test_pipeline_turns_uint8_into_normalised_float():
    cfg = AugmentConfig(crop_scale=0.5, hflip=0.5, vflip=0.1, rotation=10, translate=2, color_jitter=0.3,
                        hue=0.05, blur_sigma=1.0, cutout=6)
    aug = BatchAugment(cfg, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = (images(16) * 255).to(torch.uint8)
    out = aug(x, gen())
    assert out.dtype == torch.float32 and out.shape == (16, 3, 32, 32)
    assert -2.01 <= out.min() and out.max() <= 2.01
    plain = BatchAugment(AugmentConfig(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(x, gen())
    torch.testing.assert_close(plain, (x.float() / 255 - 0.5) / 0.25)


def test_per_image_pipeline_matches_the_batched_one_in_form():
    import numpy as np
    from PIL import Image

    from resnet.loader import per_image_transform

    cfg = AugmentConfig(crop_scale=0.5, translate=2, hflip=0.5, vflip=0.5, rotation=10, color_jitter=0.3, hue=0.1,
                        blur_sigma=1.0, cutout=6)
    t = per_image_transform(cfg, (0.5,) * 3, (0.25,) * 3, auto_augment="rand-m9-mstd0.5", random_erasing=0.5)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    out = t(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    plain = per_image_transform(AugmentConfig(), (0.5,) * 3, (0.25,) * 3)(img)
    torch.testing.assert_close(plain, (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - 0.5) / 0.25)
