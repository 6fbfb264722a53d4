"""Models: random init only (no downloads); local weights files written by the test."""
from __future__ import annotations

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from cxr_ray import models
from cxr_ray.models import ModelError

SIZE = 32
# backbone -> pooled feature width F that the head sees (read off each architecture)
BACKBONES = {"resnet18": 512, "mobilenetv3_small_050": 1024, "convnext_atto": 320}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def first_conv_name(backbone: str) -> str:
    return timm.get_pretrained_cfg(backbone).first_conv


def classifier_name(backbone: str) -> str:
    return timm.get_pretrained_cfg(backbone).classifier


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("head", ["linear", "keras16"])
def test_output_shape_parameter_count_and_gray_input(backbone, head):
    torch.manual_seed(0)
    model = models.build_model(backbone, head=head, image_size=SIZE)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(3, 1, SIZE, SIZE))
    assert out.shape == (3,)
    assert torch.isfinite(out).all()

    stem = model.backbone.get_submodule(first_conv_name(backbone))
    assert isinstance(stem, nn.Conv2d) and stem.in_channels == 1

    # backbone parameters by hand from timm's stock 3-channel, 1000-class model:
    # drop the classifier (F*1000 + 1000) and two of the three input channels of the stem
    f = BACKBONES[backbone]
    stock = timm.create_model(backbone, pretrained=False)
    stock_stem = stock.get_submodule(first_conv_name(backbone)).weight
    backbone_params = n_params(stock) - (f * 1000 + 1000) - stock_stem.numel() * 2 // 3
    assert n_params(model.backbone) == backbone_params
    h = 16
    head_params = f + 1 if head == "linear" else f * h + h + h + 1
    assert n_params(model.head) == head_params
    assert models.count_parameters(model) == backbone_params + head_params


def test_training_mode_forward_and_backward():
    model = models.build_model("resnet18", head="keras16", image_size=SIZE)
    model.train()
    out = model(torch.randn(4, 1, SIZE, SIZE))
    out.sum().backward()
    assert out.shape == (4,)
    assert model.backbone.conv1.weight.grad is not None and model.head[0].weight.grad is not None


def test_frozen_backbone_gets_no_gradient():
    model = models.build_model("resnet18", image_size=SIZE)
    model.frozen_backbone = True
    model.train()
    model(torch.randn(2, 1, SIZE, SIZE)).sum().backward()
    assert model.backbone.conv1.weight.grad is None
    assert model.head[1].weight.grad is not None
    assert not model.backbone.training  # BatchNorm statistics stay put in the probe phase


def test_keras16_head_structure_default_and_custom():
    model = models.build_model("resnet18", head="keras16", image_size=SIZE)
    head = list(model.head)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (head[0].in_features, head[0].out_features) == (512, 16)
    assert head[2].p == 0.5
    assert (head[3].in_features, head[3].out_features) == (16, 1)

    custom = models.build_model("resnet18", head="keras16", hidden=32, dropout=0.2, image_size=SIZE)
    head = list(custom.head)
    assert (head[0].out_features, head[3].in_features) == (32, 32)
    assert head[2].p == 0.2

    linear = models.build_model("resnet18", head="linear", dropout=0.3, image_size=SIZE)
    assert [type(m) for m in linear.head] == [nn.Dropout, nn.Linear]
    assert linear.head[0].p == 0.3 and linear.head[1].in_features == 512


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_local_weights_file_is_loaded_and_folded_to_gray(backbone, fmt, tmp_path):
    torch.manual_seed(1)
    saved = timm.create_model(backbone, pretrained=False)  # 3 channels, 1000 classes
    state = {k: v.clone() for k, v in saved.state_dict().items()}
    path = tmp_path / f"{backbone}.{fmt}"
    if fmt == "safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)

    torch.manual_seed(2)  # a different random init, so equality below proves loading
    model = models.build_model(backbone, pretrained=str(path), image_size=SIZE)
    loaded = model.backbone.state_dict()

    stem, fc = first_conv_name(backbone) + ".weight", classifier_name(backbone)
    dropped = {k for k in state if k.startswith(fc + ".")}
    assert dropped == {fc + ".weight", fc + ".bias"}
    assert set(loaded) == set(state) - dropped  # classifier weights dropped, nothing else missing
    assert loaded[stem].shape[1] == 1
    # timm's in_chans=1 folding: the RGB filters summed over the input channels
    assert torch.equal(loaded[stem], state[stem].sum(dim=1, keepdim=True))
    for key in set(loaded) - {stem}:
        assert torch.equal(loaded[key], state[key]), key

    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, SIZE, SIZE)).shape == (2,)


def test_gray_input_through_folded_stem_equals_rgb_copy_through_stock_stem(tmp_path):
    saved = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "r18.safetensors"
    safetensors.torch.save_file(saved.state_dict(), str(path))
    model = models.build_model("resnet18", pretrained=str(path), image_size=SIZE).eval()
    saved.eval()
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        gray = model.backbone.forward_features(x)
        rgb = saved.forward_features(x.expand(-1, 3, -1, -1))
    torch.testing.assert_close(gray, rgb, rtol=1e-4, atol=1e-4)


def test_unknown_backbone_lists_close_matches():
    with pytest.raises(ModelError, match="resnett18.*did you mean.*resnet18"):
        models.build_model("resnett18")
    with pytest.raises(ModelError, match="zzqq_not_a_net.*list_models"):
        models.build_model("zzqq_not_a_net")


def test_missing_or_odd_weights_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelError, match="nope.safetensors.*not found"):
        models.build_model("resnet18", pretrained=str(missing))
    odd = tmp_path / "weights.txt"
    odd.write_text("x")
    with pytest.raises(ModelError, match="weights.txt.*expected .safetensors"):
        models.build_model("resnet18", pretrained=str(odd))


@pytest.mark.parametrize("source, target", [
    ("convnext_atto", "resnet18"),  # nothing in common: timm alone would keep the random init
    ("resnet18", "resnet34"),  # same block shapes: timm alone would half-load resnet34
])
def test_weights_of_another_architecture_raise_model_error(tmp_path, source, target):
    path = tmp_path / f"{source}.safetensors"
    safetensors.torch.save_file(timm.create_model(source).state_dict(), str(path))
    with pytest.raises(ModelError, match=f"{source}.safetensors.*{target}"):
        models.build_model(target, pretrained=str(path), image_size=SIZE)


def test_a_saved_classifier_is_not_mistaken_for_backbone_weights(tmp_path):
    path = tmp_path / "run.pth"
    torch.save(models.build_model("resnet18", image_size=SIZE).state_dict(), path)  # keys "backbone.*"
    with pytest.raises(ModelError, match="missing"):
        models.build_model("resnet18", pretrained=str(path), image_size=SIZE)


def test_unknown_head_raises():
    with pytest.raises(ModelError, match="mlp.*linear, keras16"):
        models.build_model("resnet18", head="mlp")


def test_normalization_is_the_channel_average():
    mean, std = models.normalization("resnet18")
    assert mean == pytest.approx(sum(timm.data.IMAGENET_DEFAULT_MEAN) / 3)
    assert std == pytest.approx(sum(timm.data.IMAGENET_DEFAULT_STD) / 3)
