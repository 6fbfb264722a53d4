"""What cxr-ray loads from files a study names is data, never code: a pretrained-weights file
that carries a pickled object is refused before anything in it runs (issue 12, item 11)."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch

from cxr_ray import models
from cxr_ray.models import ModelError


class Payload:
    """Unpickling this calls Path.touch(marker): code running from a weights file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_a_weights_file_carrying_code_is_refused_and_never_run(tmp_path, suffix):
    marker = tmp_path / "ran"
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    state["fc.weight"] = Payload(marker)  # type: ignore[assignment]
    path = tmp_path / f"resnet18{suffix}"
    torch.save(state, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(ModelError, match=f"resnet18{suffix}.*plain tensors"):
        models.build_model("resnet18", pretrained=str(path), image_size=32)
    assert not marker.exists()


def test_a_pickled_state_dict_loads_as_the_same_tensors_as_safetensors(tmp_path):
    import safetensors.torch
    torch.manual_seed(3)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    safetensors.torch.save_file(state, str(tmp_path / "plain.safetensors"))
    from_pth = models.build_model("resnet18", pretrained=str(tmp_path / "wrapped.pth"), image_size=32)
    from_safe = models.build_model("resnet18", pretrained=str(tmp_path / "plain.safetensors"), image_size=32)
    for (k, a), (_, b) in zip(from_pth.backbone.state_dict().items(), from_safe.backbone.state_dict().items()):
        assert torch.equal(a, b), k
