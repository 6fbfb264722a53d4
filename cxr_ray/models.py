"""timm backbone + classification head, with pretrained weights from the hub or a local file.

Grayscale input is native: timm builds the first convolution with ``in_chans=1`` and folds
pretrained RGB weights into it (summing over channels), so no channel is copied three times.
The model outputs one logit per image: P(pneumonia) = sigmoid(logit).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import socket
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import HEADS, TrainConfig
from .data import CLASSES
from .errors import CxrError


class ModelError(CxrError, ValueError):
    """Unusable model request; the message says what to change."""


class Classifier(nn.Module):
    """Backbone (pooled features) -> head -> one logit.

    ``keras16`` is the head of the original Keras experiments: Dense(hidden=16, ReLU) ->
    Dropout -> Dense(1). While ``frozen_backbone`` is set, the backbone runs without
    gradients in eval mode (the linear-probe phase).
    """

    def __init__(self, backbone: nn.Module, head: str = "linear", hidden: int = 16, dropout: float = 0.5):
        super().__init__()
        self.backbone = backbone
        features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        if head == "linear":
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, 1))
        elif head == "keras16":
            self.head = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        else:
            raise ModelError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
        self.frozen_backbone = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial feature maps of the last stage (what Grad-CAM looks at)."""
        return self.backbone.forward_features(x)

    def classify(self, feature_maps: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone.forward_head(feature_maps, pre_logits=True)
        return self.head(pooled).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen_backbone:
            self.backbone.eval()
            with torch.no_grad():
                maps = self.features(x)
            return self.classify(maps)
        return self.classify(self.features(x))


def check_backbone(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ModelError(f"unknown backbone {name!r}{hint}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def build_model(backbone: str, *, head: str = "linear", hidden: int = 16, dropout: float = 0.5,
                pretrained: bool | str = False, image_size: int = 224) -> Classifier:
    """Create the classifier. ``pretrained``: False, True (timm hub) or a local weights path."""
    check_backbone(backbone)
    kwargs: dict = {"in_chans": 1, "num_classes": 0}
    pretrained_path = pretrained
    weights_file = None
    cfg = timm.get_pretrained_cfg(backbone)
    if cfg and cfg.fixed_input_size:
        kwargs["img_size"] = image_size  # ViTs: position embeddings are resampled to this size
    saved, staging = None, None
    if isinstance(pretrained, str):
        if not os.path.isfile(pretrained):
            raise ModelError(f"pretrained weights file {pretrained!r} not found")
        if not pretrained.endswith((".safetensors", ".pth", ".pt", ".bin")):
            raise ModelError(f"pretrained weights file {pretrained!r}: expected .safetensors or .pth")
        weights_file = os.path.abspath(pretrained)
        try:  # a weights file is data, never code: torch.load(weights_only=True) refuses pickled objects
            saved = timm.models.load_state_dict(weights_file, weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling refused, corrupt archive, not a state dict
            raise ModelError(f"pretrained weights file {pretrained!r} cannot be loaded as plain tensors "
                             f"({type(e).__name__}: {str(e)[:300]}); save a state_dict or .safetensors") from None
        if not all(isinstance(v, torch.Tensor) for v in saved.values()):
            raise ModelError(f"pretrained weights file {pretrained!r} holds more than tensors; save a state_dict")
        if not weights_file.endswith(".safetensors"):  # timm itself is only ever handed safetensors
            staging = tempfile.TemporaryDirectory(prefix="cxr-ray-weights-")
            weights_file = os.path.join(staging.name, "weights.safetensors")
            save_file({k: v.detach().clone().contiguous() for k, v in saved.items()}, weights_file)
        kwargs["pretrained_cfg_overlay"] = {"file": weights_file}
        pretrained = True
    elif pretrained and not os.environ.get("HF_HUB_OFFLINE") and not _hub_reachable():
        raise ModelError(
            f"pretrained: true needs the Hugging Face hub to download {backbone} weights, and it is not "
            f"reachable from here. On a connected machine run\n"
            f"  python -c \"import timm, safetensors.torch as s; "
            f"s.save_file(timm.create_model('{backbone}', pretrained=True).state_dict(), '{backbone}.safetensors')\"\n"
            f"copy the file here and set pretrained: /path/to/{backbone}.safetensors (per arm in a study spec), "
            f"or set HF_HUB_OFFLINE=1 if the hub cache already holds it."
        )
    try:
        net = timm.create_model(backbone, pretrained=bool(pretrained), **kwargs)
    except (RuntimeError, OSError, KeyError) as e:
        raise ModelError(f"could not load weights for {backbone}: {e}") from None
    finally:
        if staging:
            staging.cleanup()
    if saved is not None:
        _check_file_covers(net, saved, str(pretrained_path), backbone)
    return Classifier(net, head, hidden, dropout)


def _check_file_covers(net: nn.Module, saved: dict, path: str, backbone: str) -> None:
    """timm loads a weights file non-strictly (the classifier is dropped), so tensors the file
    lacks would silently keep their random init: refuse such a file instead."""
    missing = [k for k in net.state_dict() if k not in saved and not k.endswith("num_batches_tracked")]
    if missing:
        raise ModelError(
            f"{path} does not hold {backbone} weights: {len(missing)} of the backbone's "
            f"{len(net.state_dict())} tensors are missing from it (e.g. {', '.join(missing[:3])}). Save the file "
            f"from timm.create_model('{backbone}', pretrained=True).state_dict()"
        )


def normalization(backbone: str) -> tuple[float, float]:
    """Grayscale mean and std from the backbone's pretrained config (channel averages).

    timm's ``in_chans=1`` folding sums the RGB filters, which matches feeding a gray image
    normalised by the averaged mean and std.
    """
    cfg = timm.get_pretrained_cfg(backbone)
    mean = cfg.mean if cfg else timm.data.IMAGENET_DEFAULT_MEAN
    std = cfg.std if cfg else timm.data.IMAGENET_DEFAULT_STD
    return float(sum(mean) / len(mean)), float(sum(std) / len(std))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_count(cfg: TrainConfig) -> int:
    """Parameters of the model ``cfg`` trains, built on PyTorch's meta device: no weights are
    allocated, so even large backbones take a fraction of a second."""
    with torch.device("meta"):
        net = build_model(cfg.backbone, head=cfg.head, hidden=cfg.hidden, dropout=cfg.dropout,
                          image_size=cfg.image_size)
    return count_parameters(net)


# ----------------------------------------------------------------------------- input and inference

def normalize(x_uint8: torch.Tensor, norm: tuple[float, float]) -> torch.Tensor:
    """Cached uint8 pixels -> the model's input: scaled to 0..1, then (x - mean) / std."""
    return (x_uint8.float() / 255.0 - norm[0]) / norm[1]


def predict(model: nn.Module, images: np.ndarray, rows: np.ndarray, norm: tuple[float, float],
            device: torch.device, batch: int = 256, amp: bool = False) -> np.ndarray:
    """P(pneumonia) for cache ``rows``, in order."""
    out = []
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for i in range(0, len(rows), batch):
            x = torch.from_numpy(images[np.asarray(rows[i:i + batch])]).unsqueeze(1).to(device)
            out.append(torch.sigmoid(model(normalize(x, norm)).float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, epoch: int, cfg: TrainConfig,
                    norm: tuple[float, float], report: dict, train_state: dict | None = None) -> None:
    """Weights of the served model (safetensors), optimiser/scheduler state and anything else needed
    to resume (``train_state``; tensors and numbers only, so weights_only-safe) and metadata (JSON)."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                **(train_state or {})}, directory / "train_state.pt")
    meta = {
        "backbone": cfg.backbone, "head": cfg.head, "hidden": cfg.hidden, "dropout": cfg.dropout,
        "image_size": cfg.image_size, "mean": norm[0], "std": norm[1], "channels": 1,
        "geometry": "resize short side, centre crop", "threshold": report["threshold"],
        "class_names": list(CLASSES), "epoch": epoch, "metrics": report,
        "config": dataclasses.asdict(cfg), "study": cfg.study, "arm": cfg.arm, "spec_hash": cfg.spec_hash,
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=1, default=str))


def _architecture(meta: dict) -> tuple:
    return meta["backbone"], meta["head"], meta["hidden"], meta["dropout"], meta["image_size"]


def _build_for(meta: dict) -> Classifier:
    backbone, head, hidden, dropout, image_size = _architecture(meta)
    return build_model(backbone, head=head, hidden=hidden, dropout=dropout, pretrained=False, image_size=image_size)


def load_checkpoint(checkpoint_dir: str | Path) -> tuple[Classifier, dict]:
    """A checkpoint's model (eval mode) and metadata, loaded without pickle."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = json.loads((checkpoint_dir / "meta.json").read_text())
    model = _build_for(meta)
    model.load_state_dict(load_file(str(checkpoint_dir / "model.safetensors")))
    return model.eval(), meta


def local_device() -> torch.device:
    """The accelerator this process was given (Ray sets CUDA_VISIBLE_DEVICES per task/actor), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def predict_checkpoints(checkpoint_dirs: dict, images: np.ndarray, workers: int | None = None,
                        device: torch.device | None = None) -> dict:
    """key -> P(pneumonia) of every image of ``images`` under that key's checkpoint (a local
    directory), in batches. One model is built per architecture and worker, and its weights are
    swapped per checkpoint (an arm's seeds share it). On CPU, ``workers`` checkpoints (default:
    every core this process may use) are scored at once, each on one core: small models split over
    several threads wait at every operator for the slowest thread, which on a busy 2-core machine
    made scoring 7x slower than one thread (README, Results). On a GPU, one after another."""
    device = device or local_device()
    workers = 1 if device.type == "cuda" else workers or len(os.sched_getaffinity(0))
    torch.set_num_threads(1)
    rows, local = np.arange(len(images)), threading.local()

    def score(item):
        key, directory = item
        meta = json.loads((Path(directory) / "meta.json").read_text())
        built = local.__dict__.setdefault("built", {})
        arch = _architecture(meta)
        if arch not in built:
            built[arch] = _build_for(meta).to(device)
        model = built[arch]
        model.load_state_dict(load_file(str(Path(directory) / "model.safetensors"), device=str(device)))
        return key, predict(model, images, rows, (meta["mean"], meta["std"]), device)

    with ThreadPoolExecutor(max(1, min(workers, len(checkpoint_dirs)))) as pool:
        return dict(pool.map(score, checkpoint_dirs.items()))
