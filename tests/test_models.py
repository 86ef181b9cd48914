import pytest
import torch

from resnet.models import PARAM_LIMIT, count_parameters, create_model, list_models


@pytest.mark.parametrize("name", list_models())
def test_registered_models_stay_under_the_parameter_limit(name):
    n = count_parameters(create_model(name))
    if "_big" not in name:
        assert n < PARAM_LIMIT, f"{name} has {n:,} parameters"


def test_report_net_has_the_reports_parameter_count():
    model = create_model("resnet_report_4m")
    assert count_parameters(model) == 4_587_690
    assert [len(stage) for stage in model.stages] == [3, 2, 4, 3]
    assert [stage[0].conv1[0].out_channels for stage in model.stages] == [32, 64, 128, 256]
    assert model.stem[0][0].kernel_size == (3, 3)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_forward_backward_is_finite(name, activation):
    torch.manual_seed(0)
    model = create_model(name, activation=activation)
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert out.shape == (4, 10)
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]  # frozen: whitening filters, BN scales
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_activation_choice_reaches_every_block():
    model = create_model("resnet_report_4m", activation="silu")
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.GELU, torch.nn.SiLU))}
    assert kinds == {"SiLU"}


def test_overrides_define_variants():
    model = create_model("resnet_report_4m", blocks=[1, 1], widths=[16, 32], block="bottleneck")
    assert len(model.stages) == 2
    assert model.head.in_features == 32 * 4
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        create_model("resnet9000")
    for name in list_models():
        assert name in str(e.value)


def test_bad_builder_arguments_are_named():
    with pytest.raises(ValueError, match="activation"):
        create_model("resnet_tiny_20k", activation="tanh")
    with pytest.raises(ValueError, match="same length"):
        create_model("resnet_tiny_20k", blocks=[1, 1], widths=[8, 16, 32])


def test_tta_levels_average_the_right_views():
    from resnet.engine import tta_logits

    torch.manual_seed(0)
    model = create_model("resnet_tiny_20k").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain, mirror = model(x), model(x.flip(-1))
        torch.testing.assert_close(tta_logits(model, x, 0), plain)
        torch.testing.assert_close(tta_logits(model, x, 1), (plain + mirror) / 2)
        level2 = tta_logits(model, x, 2)
    assert level2.shape == (3, 10) and not torch.allclose(level2, (plain + mirror) / 2)

