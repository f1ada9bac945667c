"""What a run trains on: the model configuration, its input size, normalisation and augmentation.

Two sources of defaults, and every explicit option overrides either:

- the ``digits`` preset (the default for ``--dataset digits``): timm's ``vit_tiny_patch16_224``
  built small enough to train from scratch on a 2-core CPU (4x4 patches of 16x16 images,
  dim 64, depth 4), the ``light`` augmentation; this is what ``fastcon compare`` measures;
- otherwise what a timm user expects: the registered architecture, its own input size and
  normalisation from its ``pretrained_cfg`` (timm's data config), and the ``simclr``
  augmentation of the SupCon paper.

Nothing is downloaded: models are created with ``pretrained=False`` and ``--pretrained PATH``
loads a local file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

AUGMENTS = ("simclr", "light")

AUGMENT_HELP = (
    "simclr: the SupCon paper's views (RandomResizedCrop scale 0.2-1, horizontal flip, ColorJitter "
    "0.4/0.4/0.4/0.1 with p=0.8, RandomGrayscale p=0.2); light: a small random rotation, scaling and "
    "shift (and a flip where it keeps the label). Default: the preset's (light for digits), else simclr"
)


class UsageError(ValueError):
    """An argument that cannot work; the message names it and says what was expected."""


@dataclass(frozen=True)
class Preset:
    model: str
    model_args: dict
    img_size: int
    augment: str
    summary: str


PRESETS = {
    "digits": Preset(
        model="vit_tiny_patch16_224",
        model_args={"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0},
        img_size=16, augment="light",
        summary="vit_tiny_patch16_224 with patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2 at "
                "16x16 px, light augmentation: a ViT that trains from scratch on the 8x8 digits in about a "
                "minute per loss on a 2-core CPU"),
}
DEFAULT_MODEL = "vit_tiny_patch16_224"

PRESET_HELP = ("digits: " + PRESETS["digits"].summary + "; none: the model's own configuration, input size and "
               "normalisation (timm's pretrained_cfg) with --augment simclr. Default: digits for --dataset digits, "
               "none for any other data set. --model, --model-args, --img-size and --augment override it "
               "(the preset's --model-args apply to its own model only)")


@dataclass
class RunConfig:
    """The resolved configuration of one run (``img_size`` and the normalisation are filled in
    from the built model by :meth:`with_model_defaults`)."""
    model: str
    model_args: dict
    augment: str
    preset: str | None = None
    img_size: int | None = None
    mean: tuple = ()
    std: tuple = ()
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    num_params: int = 0
    sources: dict = field(default_factory=dict)  # setting -> where it came from (preset, model, option)

    def with_model_defaults(self, backbone) -> "RunConfig":
        """Input size (unless set), mean, std, interpolation and crop fraction from timm's data
        config of ``backbone`` (its ``pretrained_cfg``)."""
        from timm.data import resolve_model_data_config

        data_config = resolve_model_data_config(backbone)
        sources = dict(self.sources)
        img_size = self.img_size
        if img_size is None:
            img_size = int(data_config["input_size"][-1])
            sources["img_size"] = "the model's pretrained_cfg"
        return replace(self, img_size=img_size, mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                       interpolation=data_config.get("interpolation") or "bilinear",
                       crop_pct=float(data_config.get("crop_pct") or 1.0),
                       num_params=sum(p.numel() for p in backbone.parameters()), sources=sources)

    def describe(self) -> str:
        """One line saying what really runs (the model banner)."""
        args = ", ".join(f"{k}={v}" for k, v in self.model_args.items()) or "registered architecture"
        preset = f"preset {self.preset}: " if self.preset else ""
        return (f"{preset}{self.model} ({args}; {self.num_params / 1e6:.2f}M backbone parameters) at "
                f"{self.img_size}x{self.img_size} px, normalised with mean {_fmt(self.mean)} std {_fmt(self.std)}, "
                f"{self.augment} augmentation")

    def input_config(self) -> dict:
        """What a saved model needs to see its inputs as in training."""
        return {"img_size": self.img_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct}


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def parse_model_args(text: str) -> dict:
    """``"k=v,k=v"`` -> keyword arguments for ``timm.create_model`` (values read as JSON when they parse)."""
    import json

    args = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--model-args: expected key=value, got {item!r}")
        try:
            args[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            args[key.strip()] = value.strip()
    return args


def default_preset(dataset: str) -> str | None:
    return "digits" if dataset.partition("=")[0].strip().lower() == "digits" else None


def resolve(args) -> RunConfig:
    """The run's configuration from the command-line options (before the model is built).

    Raises :class:`UsageError` for an unknown preset, augmentation or timm model name."""
    import timm

    preset_name = getattr(args, "preset", None)
    if preset_name is None:
        preset_name = default_preset(args.dataset)
    elif preset_name == "none":
        preset_name = None
    elif preset_name not in PRESETS:
        raise UsageError(f"--preset: expected one of {', '.join(PRESETS)}, none; got {preset_name!r}")
    preset = PRESETS.get(preset_name) if preset_name else None
    sources = {}

    model = args.model or (preset.model if preset else DEFAULT_MODEL)
    if not timm.is_model(model):
        raise UsageError(f"--model {model!r} is not a timm model name (timm.list_models('*vit*') lists some)")
    if args.model_args is not None:
        model_args = parse_model_args(args.model_args)
    elif preset and model == preset.model:
        model_args, sources["model_args"] = dict(preset.model_args), f"preset {preset_name}"
    else:
        model_args = {}
    img_size = args.img_size
    if img_size is None and preset:
        img_size, sources["img_size"] = preset.img_size, f"preset {preset_name}"
    if img_size is not None and img_size < 1:
        raise UsageError(f"--img-size: expected a positive number of pixels, got {img_size}")
    augment = args.augment or (preset.augment if preset else "simclr")
    if augment not in AUGMENTS:
        raise UsageError(f"--augment: expected one of {', '.join(AUGMENTS)}, got {augment!r}")
    return RunConfig(model=model, model_args=model_args, augment=augment, preset=preset_name, img_size=img_size,
                     sources=sources)
