"""The network: a timm backbone, a linear classifier and a projection head; checkpoints.

The backbone is any timm model created with ``num_classes=0`` (its pooled, pre-logit
features). The classifier reads those features; the projection head (``Linear -> ReLU
-> Linear``, as in SupCon and Core-tuning's contrastor) maps them to the space where the
contrastive losses work. Nothing is ever fetched from a model hub: ``pretrained=False``
always, and ``--pretrained PATH`` loads a local file.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .config import UsageError


class Network(nn.Module):
    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, proj_dim: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(num_features, num_classes)
        self.projector = nn.Sequential(
            nn.Linear(num_features, num_features), nn.ReLU(inplace=True), nn.Linear(num_features, proj_dim)
        )

    def forward(self, images: torch.Tensor, heads=None, labels=None):
        """``(features, logits)``: the backbone's pooled features and the classifier's logits;
        or, given a recipe's ``heads(net, features, labels)``, what that returns (so that
        under DDP every parameter a recipe uses is used inside ``forward``)."""
        features = self.backbone(images)
        if heads is not None:
            return heads(self, features, labels)
        return features, self.classifier(features)


def build_network(model: str, model_args: dict, *, num_classes: int, img_size: int | None, proj_dim: int,
                  pretrained: str | None = None, log=print) -> Network:
    """The timm backbone ``model`` (``pretrained=False``) with the two heads. ``img_size`` is
    passed to models that take it (ViTs); ``None`` keeps the model's own. A name timm does not
    know or a keyword the model does not take raises :class:`UsageError`."""
    import timm

    kwargs = dict(model_args)
    if img_size is not None:
        kwargs.setdefault("img_size", img_size)
    try:
        try:
            backbone = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc) or "img_size" in model_args:
                raise
            kwargs.pop("img_size")  # a convolutional model: any input size works
            backbone = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
    except TypeError as exc:
        raise UsageError(f"--model-args {_format_args(model_args)}: {model} does not take them ({exc})") from exc
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise UsageError(f"--model {model!r} is not a timm model name (timm.list_models('*vit*') lists some)") \
                from exc
        raise
    if pretrained:
        load_pretrained(backbone, pretrained, log=log)
    return Network(backbone, backbone.num_features, num_classes, proj_dim)


def _format_args(model_args: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in model_args.items()) or "''"


def read_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--pretrained {path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:  # timm's .pth / .bin: a state dict, possibly wrapped
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "module"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    if not isinstance(state, dict):
        raise UsageError(f"--pretrained {path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(backbone: nn.Module, path: str, *, log=print) -> None:
    """Load a local timm checkpoint into ``backbone``; keys that do not fit (the old
    classification head, or any shape mismatch) are dropped, and the message says which."""
    state = read_state_dict(path)
    own = backbone.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    dropped = sorted(set(state) - set(kept))
    missing = sorted(set(own) - set(kept))
    backbone.load_state_dict(kept, strict=False)
    log(f"loaded {len(kept)} tensors from {path}")
    if dropped:
        log(f"dropped {len(dropped)} that do not fit this model: {', '.join(dropped[:8])}"
            + (" ..." if len(dropped) > 8 else ""))
    if missing:
        log(f"{len(missing)} tensors of the model stay freshly initialised: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else ""))


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT = "model.safetensors"
CONFIG = "model.json"


def save_checkpoint(net: Network, out_dir: str, config: dict) -> str:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    path = os.path.join(out_dir, CHECKPOINT)
    save_file(state, path)
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return path


def load_checkpoint(out_dir: str) -> Network:
    """The network a run saved in ``out_dir`` (``model.json`` + ``model.safetensors``)."""
    from safetensors.torch import load_file

    with open(os.path.join(out_dir, CONFIG)) as f:
        config = json.load(f)
    net = build_network(config["model"], config["model_args"], num_classes=config["num_classes"],
                        img_size=config["img_size"], proj_dim=config["proj_dim"], log=lambda *_: None)
    net.load_state_dict(load_file(os.path.join(out_dir, CHECKPOINT)))
    return net.eval()
