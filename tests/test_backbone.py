"""torchvision-style state dicts load as backbones whose taps equal torchvision's own outputs."""
from __future__ import annotations

import torch
import torchvision

from pretrain.checkpoint import load_checkpoint


def test_torchvision_vgg16_bn_state_dict(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.vgg16_bn(weights=None).eval()
    path = tmp_path / "vgg16_bn.pth"
    torch.save(ref.state_dict(), path)
    loaded = load_checkpoint(path)
    assert (loaded.spec.arch, loaded.spec.sobel, loaded.spec.k) == ("vgg16", False, 1000)
    net = loaded.model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        conv5 = net.forward_taps(x, ["conv5"])["conv5"]
        # torchvision: features[:-1] ends with the ReLU after conv5_3 (the last max-pool dropped)
        expected = ref.features[:-1](x)
    assert torch.equal(conv5, expected)


def test_torchvision_resnet50_state_dict(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "r50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    net = load_checkpoint(path).model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = net.forward_taps(x, ["conv5", "pool5"])
        h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        layer4 = ref.layer4(ref.layer3(ref.layer2(ref.layer1(h))))
    assert torch.equal(got["conv5"], layer4)
    assert torch.allclose(got["pool5"], torch.flatten(ref.avgpool(layer4), 1))
