"""Script configs as dataclasses; dashed CLI flags generated from the fields.

Precedence: dataclass default < ``--config recipe.yaml`` < command-line flag. The resolved config is
saved with every run (``config.yaml``) so a run can be repeated with ``--config runs/<run>/config.yaml``.
A saved config repeats the experiment, never the launch: the fields in ``LAUNCH_FIELDS`` are neither
saved nor read from a recipe, so a repeat goes to a new run folder unless the command line names one.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from .atomic import atomic_write_text
from .knobs import ConfigError, knob
from .models import ACTIVATIONS, list_models
from .techniques import REGISTRY as TECHNIQUES

T = TypeVar("T")
# torch.compile modes; reduce-overhead records CUDA graphs, the max-autotune ones time GPU kernels.
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
TTA_HELP = "test-time augmentation: 0 off, 1 average with the mirror image, 2 also 1-pixel shifts"


@dataclass
class CoreTrainConfig:
    """The fields of train.py that belong to no technique (those declare their own: resnet/techniques/)."""

    # --- model
    model: str = knob("resnet_report_4m", f"registered model name: {', '.join(list_models())}")
    model_kwargs: dict = knob({}, "JSON/YAML dict of overrides for the model builder, e.g. "
                                  "'{\"blocks\": [2,2,2,2], \"widths\": [32,64,128,256]}'")
    activation: str | None = knob(None, "activation override for the model", choices=sorted(ACTIVATIONS))
    channels_last: bool = knob(True, "NHWC memory layout (faster convs on CPU and tensor cores)")
    compile: bool = knob(False, "torch.compile the model (one-time compile cost, then faster steps on GPU)")
    compile_mode: str = knob("default", "with --compile: torch.compile's mode; reduce-overhead (CUDA graphs) and the "
                                        "max-autotune modes only on a GPU, a CPU run falls back to the default mode",
                             choices=list(COMPILE_MODES))
    # --- optimisation
    opt: str = knob("sgd", "optimizer; muon = Muon on conv filters, Nesterov SGD on the rest (airbench94_muon)",
                    choices=["sgd", "nesterov", "adam", "adamw", "muon"])
    lr: float | None = knob(None, "peak learning rate, in lr-unit terms (default: sgd/nesterov 0.1, adam 1e-3, "
                                  "adamw 2e-3; muon: its SGD part 0.1)")
    lr_unit: str = knob("batch", "what --lr is per: batch = the optimizer's lr as given; image1024 = per 1024 "
                                 "images, the optimizer gets lr x global batch / 1024, so the decay per image (lr x wd "
                                 "per step) stays fixed too and the batch size changes without retuning (airbench's)",
                        choices=["batch", "image1024"])
    norm_bias_lr_scale: float = knob(1.0, "lr multiplier for norm-layer biases (airbench: 64, with frozen BN scales)")
    weight_decay: float | None = knob(None, "L2 / decoupled weight decay, not applied to norms and biases "
                                           "(default: sgd/nesterov 5e-4, adam 0, adamw 0.05)")
    momentum: float = knob(0.9, "SGD momentum")
    epochs: float = knob(40.0, "training epochs; fractions allowed (9.9 = 9 full epochs, then the first 90%% of "
                               "the steps of a 10th)")
    batch_size: int = knob(256, "images per optimizer step on each process (global batch = this x processes)")
    lr_scale: str = knob("none", "scale --lr with the process count: linear (x N) or sqrt (x sqrt N)",
                         choices=["none", "linear", "sqrt"])
    sync_bn: bool = knob(False, "synchronise BatchNorm statistics across processes (small per-process batches)")
    schedule: str = knob("cosine", "lr after the warm-up: cosine or linear (airbench) down to --min-lr-ratio at "
                                   "the end", choices=["cosine", "linear"])
    warmup_epochs: float = knob(1.0, "linear warm-up from warmup_lr_ratio*lr, in epochs (fractions allowed)")
    warmup_lr_ratio: float = knob(0.01, "warm-up start lr as a fraction of the peak lr")
    min_lr_ratio: float = knob(0.0, "final lr (cosine floor, linear end) as a fraction of the peak lr")
    label_smoothing: float = knob(0.1, "label smoothing of the cross-entropy target (0 = off)")
    # --- augmentation (each one off at 0 / False; the defaults are our recipe, not the report's)
    crop_scale: float = knob(0.0, "random resized crop: smallest area fraction kept, e.g. 0.35 (0 = off)")
    crop_ratio: float = knob(0.75, "random resized crop: aspect ratio range [r, 1/r]")
    translate: int = knob(4, "random translation by up to N pixels (pad-and-crop; 0 = off)")
    hflip: float = knob(0.5, "probability of a horizontal flip")
    flip: str = knob("random", "horizontal flips: random = a coin with --hflip per image and epoch; alternate = "
                               "a fixed random half mirrored on even epochs, the other half on odd ones (airbench; "
                               "--hflip unused)", choices=["random", "alternate"])
    vflip: float = knob(0.0, "probability of a vertical flip")
    rotation: float = knob(0.0, "random rotation, uniform in [-deg, +deg]")
    color_jitter: float = knob(0.0, "brightness/contrast/saturation jitter strength, e.g. 0.4 (0 = off)")
    hue: float = knob(0.0, "hue jitter, fraction of the colour circle in [-h, +h], at most 0.5")
    jitter_p: float = knob(0.8, "probability an image gets colour jitter when it is on")
    blur_sigma: float = knob(0.0, "Gaussian blur: largest sigma in pixels, per-image uniform in [0.1, max] (0 = off)")
    blur_p: float = knob(0.5, "probability an image is blurred when blur is on")
    cutout: int = knob(0, "cutout square side in pixels at a random position (0 = off)")
    cutout_p: float = knob(1.0, "probability an image gets a cutout when cutout is on")
    auto_augment: str | None = knob(None, "timm policy per image, needs --loader workers: 'rand-m9-mstd0.5', "
                                          "'augmix-m5-w3' or 'original' (AutoAugment)")
    random_erasing: float = knob(0.0, "timm random erasing probability per image, needs --loader workers")
    # --- data
    loader: str = knob("device", "device: whole dataset on the accelerator, batched augmentation (fast); "
                                 "workers: DataLoader with per-image PIL/timm transforms", choices=["device", "workers"])
    workers: int = knob(2, "DataLoader worker processes for --loader workers")
    data_dir: str = knob("~/.cache/cifar10", "folder holding (or to receive) cifar-10-batches-py/")
    download: bool = knob(True, "download the official archive when the data is missing")
    val_split: int = knob(5000, "images held out of train for validation (stratified; 0 = none)")
    split_seed: int | None = knob(None, "seed of the train/validation split (default: --seed), to compare seeds "
                                        "or recipes on the same validation images")
    train_subset: int = knob(0, "use only the first N training images after the split (0 = all)")
    # --- run
    seed: int = knob(0, "seed for initialisation, data order and augmentation")
    run_dir: str | None = knob(None, "run folder (default: runs/<model>-<activation>-<opt>-<time>)")
    resume: str | None = knob(None, "run folder to continue from its last saved state")
    overwrite: bool = knob(False, "start afresh in a --run-dir that already holds a run (its files are deleted)")
    time_budget: str | None = knob(None, "train for the best run that fits in this time (90s, 15m, 1h30m): the "
                                         "launch measures its step rate, plans the steps so that it ends within the "
                                         "budget (validation and TTA included) and scales --epochs and every other "
                                         "length in epochs to them; config.yaml records the planned lengths")
    eval_every: int = knob(1, "validate every N epochs (the last epoch always validates)")
    tta: int = knob(0, "final-epoch validation " + TTA_HELP, choices=[0, 1, 2])
    progress: bool = knob(True, "show a progress bar on the main process")
    check_every: int = knob(25, "read the running loss back from the device every N steps: there it is checked "
                                "for nan/inf and, across processes, a stop (SIGTERM, Ctrl-C) is agreed on; the "
                                "steps in between never wait for the device")
    # --- tracking
    wandb: str = knob("auto", "W&B logging: auto = online when logged in, else offline", choices=["auto", "online", "offline", "off"])
    wandb_project: str = knob("cifar10-resnet", "W&B project")
    wandb_name: str | None = knob(None, "W&B run name (default: model-activation-opt-seed)")
    wandb_group: str | None = knob(None, "W&B group (default: a hash of the config without the seed, so seeds "
                                         "of one setup group together)")
    wandb_tags: list = knob([], "W&B tags, comma-separated, added to the model, activation and optimizer")


def _train_config() -> type:
    """train.py's config: CoreTrainConfig's fields, then each technique's own, in registry order."""
    bases = tuple(t.fields for t in reversed(TECHNIQUES) if t.fields is not None) + (CoreTrainConfig,)
    doc = "train.py's config: the core fields, then every technique's (resnet/techniques/)."
    return dataclass(type("TrainConfig", bases, {"__module__": __name__, "__doc__": doc}))


TrainConfig = _train_config()


@dataclass
class EvalConfig:
    checkpoint: str | None = knob(None, "run folder or .safetensors file (default: the run in runs/ whose weights "
                                        "were written last)")
    split: str = knob("test", "which CIFAR-10 split to score", choices=["test", "val"])
    data: str | None = knob(None, "custom labeled pickle (dict with data, labels) instead of CIFAR-10")
    data_dir: str | None = knob(None, "folder holding cifar-10-batches-py/ for --split test|val (default: the run's "
                                      "own --data-dir, from its config.yaml; else ~/.cache/cifar10)")
    download: bool = knob(True, "download the official archive when the data is missing")
    val_split: int | None = knob(None, "validation size used for --split val (default: the run's own)")
    batch_size: int = knob(500, "images per forward pass")
    tta: int | None = knob(None, TTA_HELP + " (default: the level the run validated with)", choices=[0, 1, 2])
    out: str | None = knob(None, "JSON report path (default: <run>/eval_<split>.json; eval_<split>_tta<k>.json with "
                                 "TTA level k)")
    wandb: str = knob("auto", "log the scores into the training run's W&B run (when it had one): auto = online "
                              "when logged in, else offline", choices=["auto", "online", "offline", "off"])


@dataclass
class PredictConfig:
    data: str = knob("custom_test.pkl", "pickle with 'data' (N,3072 or N,32,32,3 uint8) and 'ids'")
    out: str = knob("submission.csv", "CSV to write with header ID,Labels")
    checkpoint: str | None = knob(None, "run folder or .safetensors file (default: the most recently trained run's best)")
    batch_size: int = knob(500, "images per forward pass")
    tta: int | None = knob(None, TTA_HELP + " (default: the level the run validated with)", choices=[0, 1, 2])


# How a run was launched, not what it trains: a recipe (a run's own config.yaml included) never sets them,
# or repeating a run would write into (or --overwrite) the run it repeats, or plan its length again (a
# budgeted run's config.yaml holds the lengths its budget planned).
LAUNCH_FIELDS = ("run_dir", "resume", "overwrite", "time_budget")


# --help sections, timm-style: each starts at the named field and runs to the next section's first field.
HELP_SECTIONS = {"model": "model", "opt": "optimisation", "crop_scale": "augmentation", "loader": "data",
                 "seed": "run", "wandb": "tracking",
                 **{dataclasses.fields(t.fields)[0].name: t.title for t in TECHNIQUES if t.fields is not None}}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one ``error:`` line (no usage dump) and suggests near flags."""

    def error(self, message: str) -> typing.NoReturn:
        if "unrecognized arguments" in message:
            known = [o for a in self._actions for o in a.option_strings]
            unknown = message.split(":", 1)[1].split()
            hints = {u: difflib.get_close_matches(u.split("=")[0], known, n=1) for u in unknown}
            hints = [f"{u} (did you mean {h[0]}?)" for u, h in hints.items() if h]
            if hints:
                message += "; " + ", ".join(hints)
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """``str | None`` -> ``str``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _parse_dict(text: str) -> dict:
    try:
        value = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON/YAML mapping, got {text!r} ({_yaml_problem(e)})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON/YAML mapping, got {text!r}")
    return value


def _parse_list(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + str(getattr(e, "problem", None) or e).strip()


def build_parser(cls: type, description: str) -> ArgumentParser:
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="RECIPE.yaml", help="YAML recipe whose keys set defaults; flags win")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    hints = typing.get_type_hints(cls)
    group: Any = parser
    for f in dataclasses.fields(cls):
        if f.name in HELP_SECTIONS and cls is TrainConfig:
            group = parser.add_argument_group(HELP_SECTIONS[f.name])
        tp = _base_type(hints[f.name])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        text = f.metadata.get("help", "")
        kw: dict[str, Any] = {"help": text if "default" in text else f"{text} (default: {default})", "dest": f.name,
                              # SUPPRESS: only flags actually given override a --config recipe
                              "default": argparse.SUPPRESS}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif tp is dict:
            kw.update(type=_parse_dict, metavar="JSON")
        elif tp is list:
            kw.update(type=_parse_list, metavar="A,B")
        else:
            kw["type"] = tp
        group.add_argument(_flag(f.name), **kw)
    return parser


def _coerce(cls: type, name: str, value: Any, source: str) -> Any:
    """Check a recipe value against the field's type.

    Ints are accepted where floats are expected, and numeric strings where numbers are: PyYAML reads
    ``1e-3`` (no dot) as a string, and people write recipes that way.
    """
    tp_full = typing.get_type_hints(cls)[name]
    tp = _base_type(tp_full)
    if value is None and type(None) in typing.get_args(tp_full):
        return None
    if tp in (int, float) and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{source}: field '{name}' expects a number, got {value!r}") from None
        value = int(number) if tp is int and number.is_integer() else number
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # head_scale: 0.5
    if tp is list and isinstance(value, str):
        return _parse_list(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: field '{name}' expects {tp.__name__}, got {value!r}")
    choices = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{source}: field '{name}' must be one of {choices}, got {value!r}")
    return value


def load_recipe(cls: type, path: str | Path) -> dict:
    """Read a YAML recipe; unknown keys and wrong types fail with the file and field named."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the recipe ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"known fields: {', '.join(sorted(known))}"
            raise ConfigError(f"{path}: unknown field '{key}'; {hint}")
        out[name] = _coerce(cls, name, value, str(path))
    return out


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str = "") -> T:
    """Parse ``argv`` (default: sys.argv) into ``cls``: defaults, then --config, then flags."""
    return parse_args(cls, argv, description)[0]


def parse_args(cls: type[T], argv: Sequence[str] | None = None, description: str = "") -> tuple[T, bool]:
    """``(config, debug)``: as parse_config, plus whether --debug was given."""
    parser = build_parser(cls, description)
    args = vars(parser.parse_args(argv))
    debug = args.pop("debug")
    values = {}
    recipe = args.pop("config", None)
    own_run = not recipe and bool(args.get("resume"))
    if own_run:
        # Resuming repeats the run's own saved config; flags given now (e.g. --epochs) still win.
        recipe = str(Path(args["resume"]) / "config.yaml")
        if not Path(recipe).is_file():
            parser.error(f"--resume {args['resume']}: no config.yaml there; is it a run folder of this suite?")
    if recipe:
        try:
            values.update(load_recipe(cls, recipe))
        except ConfigError as e:
            parser.error(str(e))
    # Run folders saved before LAUNCH_FIELDS existed hold them: drop them (the folder resumed now may also
    # have been moved or copied since it was saved).
    dropped = [name for name in LAUNCH_FIELDS if values.pop(name, None) not in (None, False)]
    if dropped and not own_run and os.environ.get("RANK", "0") == "0":
        print(f"note: {recipe}: ignoring {', '.join(dropped)}: a saved config repeats the experiment, not the "
              "launch; pass --run-dir to choose the run folder", file=sys.stderr)
    values.update(args)
    return cls(**values), debug


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path, header: str = "") -> None:
    """The experiment part of ``cfg`` as YAML (no ``LAUNCH_FIELDS``), after ``header`` comment lines."""
    experiment = {k: v for k, v in config_to_dict(cfg).items() if k not in LAUNCH_FIELDS}
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    atomic_write_text(Path(path), comments + yaml.safe_dump(experiment, sort_keys=False))
