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


def test_channels_last_runtime_gives_the_same_taps(tmp_path):
    """runtime.channels_last: the cell's network runs NHWC (weights stored so), and every tap
    equals the NCHW network's to float rounding; the setting is checked."""
    import pytest

    from dcbench.core import UserError
    from evaluations.backbone import describe_checkpoint, frozen_backbone
    from evaluations.context import Runtime, TaskContext

    torch.manual_seed(0)
    ref = torchvision.models.vgg16_bn(weights=None).eval()
    path = tmp_path / "vgg16_bn.pth"
    torch.save(ref.state_dict(), path)
    nets = {}
    for cl in (False, True):
        ctx = TaskContext(describe_checkpoint(path), "imagenet", tmp_path, 0,
                          Runtime(workers=0, channels_last=cl), torch.device("cpu"), tmp_path)
        nets[cl] = frozen_backbone(ctx)
    conv = nets[True].features[0] if hasattr(nets[True], "features") else None
    weights = [p for p in nets[True].parameters() if p.dim() == 4]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert conv is None or not conv.weight.is_contiguous()
    x = torch.randn(2, 3, 64, 64)
    taps = ["conv1", "conv3", "conv5"]
    with torch.no_grad():
        a, b = nets[False].forward_taps(x, taps), nets[True].forward_taps(x, taps)
    for t in taps:
        assert b[t].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(b[t], a[t], rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="channels_last must be true or false"):
        Runtime(channels_last="yes")
