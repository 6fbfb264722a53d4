"""The served model(s) and what they answer, in plain Python (testable without Serve, shared by the
bare baseline of benchmarks/bench_serve.py): probabilities of a batch of decoded images, the
answer for one, and Grad-CAM overlays.

The preprocessing is the training cache's own (``imaging.to_pixels``) with the size and
normalisation from the checkpoint's metadata, so a served probability equals the offline
evaluation's. Checkpoints load with safetensors and JSON only (no pickle).
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from . import imaging, metrics, models
from .imaging import overlay
from .data import CLASSES
from .serve_limits import image_error
from .serve_model import ModelChoice, ServingError


class Predictor:
    """Model(s) + preprocessing. Several checkpoints (a seed ensemble) are served as the mean of
    their probabilities."""

    def __init__(self, choice: ModelChoice):
        loaded = [models.load_checkpoint(c) for c in choice.checkpoints]
        self.members = [m for m, _ in loaded]
        self.meta = loaded[0][1]
        if any((m["image_size"], m["mean"], m["std"]) != (self.meta["image_size"], self.meta["mean"], self.meta["std"])
               for _, m in loaded):
            raise ServingError("an ensemble's members must share their preprocessing (image size, normalisation)")
        self.identity = choice.identity | {"backbone": self.meta["backbone"], "image_size": self.meta["image_size"],
                                           "epoch": self.meta["epoch"], "members": len(self.members)}
        self.test_metrics, self.external_metrics = choice.test_metrics, choice.external_metrics
        self.operating_point = choice.operating_point | {"platt": choice.platt}
        self.size, self.norm = self.meta["image_size"], (self.meta["mean"], self.meta["std"])
        self.threshold = float(self.meta["threshold"] if choice.threshold is None else choice.threshold)
        self.platt = choice.platt
        self.device = models.local_device()
        for model in self.members:
            model.to(self.device)
            model.requires_grad_(False)  # Grad-CAM asks for d(logit)/d(maps) only: no shared .grad state
        self.model = self.members[0]
        with torch.no_grad():
            probe = self.model.features(torch.zeros(1, 1, self.size, self.size, device=self.device))
        self.explainable = probe.ndim == 4

    def pixels(self, data: bytes, name: str) -> np.ndarray:
        """Bytes -> the cache's uint8 square, in this process; RequestError (4xx) for anything unusable."""
        try:
            return imaging.to_pixels(data, self.size, name).pixels
        except imaging.ImageError as e:
            raise image_error(e, name) from None

    def probabilities(self, arrays: list[np.ndarray]) -> np.ndarray:
        """The served P(pneumonia): the members' mean, calibrated when the operating point says so."""
        x = models.normalize(torch.from_numpy(np.stack(arrays)).unsqueeze(1).to(self.device), self.norm)
        with torch.no_grad():
            p = torch.stack([torch.sigmoid(m(x)) for m in self.members]).mean(0).cpu().numpy()
        return metrics.apply_platt(p, self.platt).astype(np.float32)

    def result(self, probability: float) -> dict:
        label = int(probability >= self.threshold)
        return {"probability": float(probability), "label": CLASSES[label], "label_index": label,
                "threshold": self.threshold, "model": self.identity}

    def explain(self, array: np.ndarray) -> tuple[bytes, float]:
        """Grad-CAM of the last feature maps, as a PNG overlay on the model's input image."""
        cam, probability = self.gradcam(array)
        return overlay_png(array, cam), probability

    def gradcam(self, array: np.ndarray) -> tuple[np.ndarray, float]:
        """The Grad-CAM map (in [0, 1], the input's shape) and the served probability of one image.

        All autograd state is this call's own (the maps are a fresh leaf, the gradient is returned,
        not accumulated into parameters), so concurrent calls on the shared model are safe.
        """
        x = models.normalize(torch.tensor(array)[None, None].to(self.device), self.norm)
        cams, probs = [], []
        for model in self.members:  # an ensemble's map is the mean of its members' maps
            with torch.no_grad():
                maps = model.features(x)
            maps.requires_grad_(True)
            with torch.enable_grad():
                logit = model.classify(maps)
                (grad,) = torch.autograd.grad(logit.sum(), maps)
            with torch.no_grad():
                cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * maps).sum(1, keepdim=True))
                cams.append(F.interpolate(cam, size=array.shape, mode="bilinear", align_corners=False)[0, 0])
            probs.append(float(torch.sigmoid(logit).item()))
        cam = torch.stack(cams).mean(0).cpu().numpy()
        cam = cam / cam.max() if cam.max() > 0 else cam
        return cam, float(metrics.apply_platt([np.mean(probs)], self.platt)[0])


def overlay_png(gray: np.ndarray, heat: np.ndarray, scale: int = 4) -> bytes:
    from PIL import Image
    img = Image.fromarray(overlay(gray, heat)).resize((gray.shape[1] * scale, gray.shape[0] * scale),
                                                      Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
