"""CIFAR-10 ResNets under 5M parameters: the model registry as a library.

    from resnet import create_model, list_models
    model = create_model("resnet_report_4m", activation="relu")

Only the models are imported here (torch, nothing else): training, Accelerate, W&B and the data
readers load when their modules are imported (``resnet.training``, ``resnet.data``, ...).
"""
from .models import count_parameters, create_model, list_models, register_model

__version__ = "0.5.0"  # pyproject.toml reads the package version from here

__all__ = ["create_model", "list_models", "register_model", "count_parameters", "__version__"]
