"""CIFAR-10 ResNets under 5M parameters: the model registry, and a trained run's net, as a library.

    from resnet import create_model, list_models
    model = create_model("resnet_report_4m", activation="relu")

    import resnet
    model = resnet.load_model("runs/<name>")               # best weights (which="last": the latest), eval mode
    labels = resnet.predict_images(model, images).argmax(1)  # uint8 (N, 32, 32, 3) or (N, 3072), the run's TTA

Only the models are imported here (torch, nothing else): training, Accelerate, W&B and the data
readers load when their modules are imported (``resnet.training``, ``resnet.data``, ...) or when
``load_model`` / ``predict_images`` is first called (``resnet.inference``).
"""
from .models import count_parameters, create_model, list_models, register_model

__version__ = "0.6.0"  # pyproject.toml reads the package version from here


def load_model(run, which: str = "best", device="cpu"):
    """A trained run's net in eval mode, its checkpoint's metadata on ``model.meta``: see
    ``resnet.inference.load_model``."""
    from .inference import load_model as load

    return load(run, which=which, device=device)


def predict_images(model, images, tta=None, batch_size: int = 500, mean=None, std=None):
    """Logits for uint8 images with the run's mean, std and TTA level: see ``resnet.inference.predict_images``."""
    from .inference import predict_images as predict

    return predict(model, images, tta=tta, batch_size=batch_size, mean=mean, std=std)


__all__ = ["create_model", "list_models", "register_model", "count_parameters", "load_model", "predict_images",
           "__version__"]
