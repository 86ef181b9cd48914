"""engine.py against hand computations: TTA views and weights, confusion-matrix orientation,
per-class accuracy; plus the package's public API (``from resnet import create_model``)."""
import json
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import resnet
from conftest import ROOT
from resnet import engine


def _tiny_model() -> nn.Module:
    """Deterministic, and neither mirror- nor shift-invariant (no pooling), so every TTA view counts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    return model.eval()


def _reflect_shift(x: torch.Tensor, d: int) -> torch.Tensor:
    """out[i, j] = x[i + d, j + d], reflecting at the border (x[-1] = x[1], x[h] = x[h-2]), by index."""
    h, w = x.shape[-2:]

    def idx(n):
        i = torch.arange(n) + d
        return torch.where(i < 0, -i, torch.where(i >= n, 2 * (n - 1) - i, i))

    return x[..., idx(h), :][..., idx(w)]


def test_reflect_shift_helper_is_what_we_think():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)  # [[0,1,2],[3,4,5],[6,7,8]]
    assert _reflect_shift(x, -1)[0, 0].tolist() == [[4, 3, 4], [1, 0, 1], [4, 3, 4]]
    assert _reflect_shift(x, 1)[0, 0].tolist() == [[4, 5, 4], [7, 8, 7], [4, 5, 4]]


@torch.no_grad()
def test_tta_levels_match_hand_computed_averages():
    model = _tiny_model()
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    f = lambda v: model(v)  # noqa: E731
    pair = lambda v: (f(v) + f(v.flip(-1))) / 2  # an image and its mirror, weight 1/2 each  # noqa: E731
    up_left, down_right = _reflect_shift(x, -1), _reflect_shift(x, 1)

    torch.testing.assert_close(engine.tta_logits(model, x, 0), f(x))
    torch.testing.assert_close(engine.tta_logits(model, x, 1), pair(x))
    # Level 2 as documented: weights 1/2 (the mirror pair), 1/4 and 1/4 (the shifted mirror pairs).
    expected = pair(x) / 2 + pair(up_left) / 4 + pair(down_right) / 4
    torch.testing.assert_close(engine.tta_logits(model, x, 2), expected, rtol=1e-5, atol=1e-6)
    # The views are distinct for this model, so the comparison above could fail.
    assert not torch.allclose(pair(x), f(x)) and not torch.allclose(expected, pair(x))


def test_confusion_matrix_rows_are_true_columns_predicted():
    targets, preds = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0])
    m = engine.confusion_matrix(targets, preds, 3)
    assert m.tolist() == [[1, 1, 0],   # true 0: once right, once called 1
                          [0, 1, 0],   # true 1: right
                          [1, 0, 0]]   # true 2: called 0
    assert m[0, 1] == 1 and m[1, 0] == 0 and m[2, 0] == 1 and m[0, 2] == 0
    assert m.sum(1).tolist() == np.bincount(targets, minlength=3).tolist()  # row sums: images per true class


def test_evaluate_report_per_class_accuracy_and_matrix(tmp_path, monkeypatch):
    """run_evaluate turns known predictions into per-class accuracy (recall per true class) and the matrix."""
    from resnet import inference
    from resnet.checkpoint import save_weights
    from resnet.config import EvalConfig
    from resnet.data import CLASSES, MEAN, STD

    model = resnet.create_model("resnet_tiny_20k")
    save_weights(tmp_path / "best.safetensors", model, {
        "model": "resnet_tiny_20k", "model_kwargs": {}, "classes": list(CLASSES), "mean": list(MEAN),
        "std": list(STD), "num_params": resnet.count_parameters(model), "val_split": 0, "seed": 0})
    targets, preds = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0])
    (tmp_path / "labeled.pkl").write_bytes(pickle.dumps({
        "data": np.zeros((4, 3072), np.uint8), "ids": np.arange(4), "labels": targets}))
    monkeypatch.setattr(inference, "evaluate", lambda *a, **k: {
        "loss": 1.0, "acc": 0.5, "n": 4, "preds": preds, "targets": targets})

    report = inference.run_evaluate(EvalConfig(checkpoint=str(tmp_path), data=str(tmp_path / "labeled.pkl"),
                                               out=str(tmp_path / "eval.json")))
    per_class = report["per_class_accuracy"]
    assert per_class["airplane"] == 0.5 and per_class["automobile"] == 1.0 and per_class["bird"] == 0.0
    assert per_class["cat"] is None  # no cat images: not a class the model got all wrong
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix[0, 1] == 1 and matrix[2, 0] == 1 and matrix.sum() == 4
    text = inference.format_report(report)
    assert "rows: true, columns: predicted" in text
    assert re.search(r"cat\s+no images", text) and re.search(r"bird\s+0\.0000", text)
    assert json.loads((tmp_path / "eval.json").read_text())["per_class_accuracy"]["cat"] is None


# ------------------------------------------------------------------------------------------------
# The package as a library
def test_public_api():
    from resnet import __version__, count_parameters, create_model, list_models, register_model  # noqa: F401

    assert "resnet_report_4m" in list_models()
    assert count_parameters(create_model("resnet_report_4m")) == 4_587_690
    assert __version__.count(".") == 2 and all(p.isdigit() for p in __version__.split("."))


def test_package_import_stays_light():
    """A notebook's ``import resnet`` must not pull in training, Accelerate or W&B."""
    code = ("import sys, resnet; heavy = [m for m in ('accelerate', 'wandb', 'timm', 'resnet.training') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_training_imports_timm_only_for_the_techniques_that_use_it():
    """timm (with torchvision and torch._dynamo) takes ~4 s to import: a default run's start-up skips it."""
    code = "import sys, resnet.training, resnet.inference; print('timm' in sys.modules, 'torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False"


def test_pyproject_matches_requirements_and_version():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "resnet.__version__"}
    pins = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    test_tools = {"pytest", "pytest-xdist", "hypothesis"}
    assert project["project"]["dependencies"] == [p for p in pins if p.split("==")[0] not in test_tools]
    assert sorted(project["project"]["optional-dependencies"]["test"]) == \
        sorted(p for p in pins if p.split("==")[0] in test_tools)
