"""pretrain.models against PROTOCOLS.md §1 and the authors' released checkpoints.

Every expectation (module indices, key names, shapes, kernels, init statistics, the conv
hyper-parameters used in the manual re-computation) is written out here from the protocol,
never read back from the code under test.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models import AlexNet, VGG16

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# AlexNet-BN (PROTOCOLS §1): (features index, out channels, kernel, stride, pad)
ALEXNET_CONVS = ((0, 96, 11, 4, 2), (4, 256, 5, 1, 2), (8, 384, 3, 1, 1),
                 (11, 384, 3, 1, 1), (14, 256, 3, 1, 1))
ALEXNET_POOLS = (3, 7, 17)  # MaxPool(3, 2) after conv1, conv2, conv5
# torchvision vgg16_bn `features`: conv indices and widths, max-pools after each block
VGG16_CONVS = ((0, 64), (3, 64), (7, 128), (10, 128), (14, 256), (17, 256), (20, 256),
               (24, 512), (27, 512), (30, 512), (34, 512), (37, 512), (40, 512))
VGG16_POOLS = (6, 13, 23, 33, 43)

SOBEL_X = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
SOBEL_Y = torch.tensor([[1., 2., 1.], [0., 0., 0.], [-1., -2., -1.]])


def expected_keys(convs, fc, sobel: bool, top: bool) -> set[str]:
    keys = set()
    for i, *_ in convs:
        keys |= {f"features.{i}.weight", f"features.{i}.bias"}
        keys |= {f"features.{i + 1}.{s}" for s in BN_KEYS}
    keys |= {f"classifier.{i}.{s}" for i in fc for s in ("weight", "bias")}
    if sobel:
        keys |= {"sobel.0.weight", "sobel.0.bias", "sobel.1.weight", "sobel.1.bias"}
    if top:
        keys |= {"top_layer.weight", "top_layer.bias"}
    return keys


@pytest.fixture(scope="module")
def alexnet() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet(sobel=True, fc_dim=4096, k=100)


@pytest.fixture(scope="module")
def vgg16() -> VGG16:
    torch.manual_seed(0)
    return VGG16(sobel=True, fc_dim=4096, k=10).eval()


def randomise_bn(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial BN statistics and affine params, so that eval-mode BN matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


# --------------------------------------------------------------------------- layout, keys


def test_alexnet_module_layout(alexnet):
    f = alexnet.features
    assert len(f) == 18
    for i, c_out, k, s, p in ALEXNET_CONVS:
        conv = f[i]
        assert type(conv) is nn.Conv2d, i
        assert (conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (
            c_out, (k, k), (s, s), (p, p)), i
        assert conv.bias is not None  # conv biases kept
        assert type(f[i + 1]) is nn.BatchNorm2d and f[i + 1].num_features == c_out
        assert type(f[i + 2]) is nn.ReLU
    for i in ALEXNET_POOLS:
        assert type(f[i]) is nn.MaxPool2d
        assert (f[i].kernel_size, f[i].stride) in ((3, 2), ((3, 3), (2, 2)))
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in alexnet.modules())
    types = [type(m) for m in alexnet.classifier]
    assert types == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU]
    assert alexnet.classifier[0].p == 0.5 and alexnet.classifier[3].p == 0.5
    assert isinstance(alexnet.top_layer, nn.Linear)


def test_alexnet_state_dict_keys_and_shapes(alexnet):
    sd = alexnet.state_dict()
    assert set(sd) == expected_keys(ALEXNET_CONVS, (1, 4), sobel=True, top=True)
    c_in = 2  # Sobel output
    for i, c_out, k, _, _ in ALEXNET_CONVS:
        assert sd[f"features.{i}.weight"].shape == (c_out, c_in, k, k)
        assert sd[f"features.{i}.bias"].shape == (c_out,)
        for s in BN_KEYS[:4]:
            assert sd[f"features.{i + 1}.{s}"].shape == (c_out,)
        c_in = c_out
    assert sd["classifier.1.weight"].shape == (4096, 9216)
    assert sd["classifier.4.weight"].shape == (4096, 4096)
    assert sd["top_layer.weight"].shape == (100, 4096)
    assert sd["top_layer.bias"].shape == (100,)
    assert sd["sobel.0.weight"].shape == (1, 3, 1, 1)
    assert sd["sobel.1.weight"].shape == (2, 1, 3, 3)


def test_alexnet_without_sobel_takes_rgb():
    torch.manual_seed(0)
    m = AlexNet(sobel=False, fc_dim=16)
    sd = m.state_dict()
    assert set(sd) == expected_keys(ALEXNET_CONVS, (1, 4), sobel=False, top=False)
    assert sd["features.0.weight"].shape == (96, 3, 11, 11)
    assert m.sobel is None and m.top_layer is None
    out = m.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 16)
    v = VGG16(sobel=False, fc_dim=16)
    assert v.sobel is None and v.features[0].weight.shape == (64, 3, 3, 3)
    assert not any(k.startswith("sobel.") for k in v.state_dict())


def test_vgg16_layout_keys_and_conv5(vgg16):
    f = vgg16.features
    assert len(f) == 44
    c_in = 2
    for i, c_out in VGG16_CONVS:
        assert type(f[i]) is nn.Conv2d
        assert (f[i].in_channels, f[i].out_channels, f[i].kernel_size, f[i].padding) == (
            c_in, c_out, (3, 3), (1, 1))
        assert type(f[i + 1]) is nn.BatchNorm2d and type(f[i + 2]) is nn.ReLU
        c_in = c_out
    for i in VGG16_POOLS:
        assert type(f[i]) is nn.MaxPool2d
    types = [type(m) for m in vgg16.classifier]
    assert types == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU]
    sd = vgg16.state_dict()
    assert set(sd) == expected_keys(VGG16_CONVS, (0, 3), sobel=True, top=True)
    assert sd["classifier.0.weight"].shape == (4096, 25088)
    assert sd["classifier.3.weight"].shape == (4096, 4096)
    assert sd["top_layer.weight"].shape == (10, 4096)
    with torch.no_grad():
        taps = vgg16.forward_taps(torch.randn(1, 3, 224, 224), ["conv5"])
    assert taps["conv5"].shape == (1, 512, 14, 14)


# --------------------------------------------------------------------------- Sobel


@pytest.mark.parametrize("cls", [AlexNet, VGG16])
def test_sobel_is_hand_written_and_frozen(cls):
    torch.manual_seed(0)
    m = cls(sobel=True, fc_dim=16, k=4)
    grey, sob = m.sobel[0], m.sobel[1]
    assert torch.equal(grey.weight, torch.full((1, 3, 1, 1), 1.0 / 3.0))
    assert torch.equal(grey.bias, torch.zeros(1))
    assert (sob.stride, sob.padding) == ((1, 1), (1, 1))
    assert torch.equal(sob.weight[0, 0], SOBEL_X)
    assert torch.equal(sob.weight[1, 0], SOBEL_Y)
    assert torch.equal(sob.bias, torch.zeros(2))
    sobel_params = list(m.sobel.parameters())
    assert len(sobel_params) == 4 and not any(p.requires_grad for p in sobel_params)
    trainable = {id(p) for p in m.trainable_parameters()}
    assert not trainable & {id(p) for p in sobel_params}
    assert not trainable & {id(p) for p in m.top_layer.parameters()}
    # every other parameter is trainable
    others = [p for n, p in m.named_parameters() if not n.startswith(("sobel.", "top_layer."))]
    assert trainable == {id(p) for p in others}
    # a training step leaves the Sobel untouched
    before = [p.clone() for p in sobel_params]
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    m.train()
    size = 64 if cls is AlexNet else 32
    m(torch.randn(2, 3, size, size)).sum().backward()
    opt.step()
    assert all(p.grad is None for p in sobel_params)
    assert all(torch.equal(a, b) for a, b in zip(before, sobel_params))


def test_sobel_front_end_matches_manual_computation():
    torch.manual_seed(0)
    m = AlexNet(sobel=True, fc_dim=16).eval()
    x = torch.randn(2, 3, 20, 20)
    grey = x.mean(dim=1, keepdim=True)
    kernels = torch.stack([SOBEL_X, SOBEL_Y]).unsqueeze(1)
    want = F.conv2d(grey, kernels, padding=1)
    with torch.no_grad():
        got = m.sobel(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- init


def test_init_statistics(alexnet):
    sd = alexnet.state_dict()
    for i, c_out, k, _, _ in ALEXNET_CONVS:
        w = sd[f"features.{i}.weight"]
        want = math.sqrt(2.0 / (k * k * c_out))
        assert w.std().item() == pytest.approx(want, rel=0.03), i
        assert abs(w.mean().item()) < 0.05 * want, i
        assert torch.count_nonzero(sd[f"features.{i}.bias"]) == 0
        bn = f"features.{i + 1}"
        assert torch.equal(sd[f"{bn}.weight"], torch.ones(c_out))
        assert torch.equal(sd[f"{bn}.bias"], torch.zeros(c_out))
        assert torch.equal(sd[f"{bn}.running_mean"], torch.zeros(c_out))
        assert torch.equal(sd[f"{bn}.running_var"], torch.ones(c_out))
    for name in ("classifier.1", "classifier.4", "top_layer"):
        w = sd[f"{name}.weight"]
        assert w.std().item() == pytest.approx(0.01, rel=0.02), name
        assert abs(w.mean().item()) < 1e-3, name
        assert torch.count_nonzero(sd[f"{name}.bias"]) == 0, name


# --------------------------------------------------------------------------- taps


def manual_alexnet(m: AlexNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """AlexNet-BN written with functional ops from PROTOCOLS §1, reading only the parameters."""
    sd = m.state_dict()
    grey = F.conv2d(x, sd["sobel.0.weight"], sd["sobel.0.bias"])
    h = F.conv2d(grey, sd["sobel.1.weight"], sd["sobel.1.bias"], padding=1)
    out = {}
    for n, (i, _, _, s, p) in enumerate(ALEXNET_CONVS, start=1):
        h = F.conv2d(h, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], stride=s, padding=p)
        b = f"features.{i + 1}"
        h = F.batch_norm(h, sd[f"{b}.running_mean"], sd[f"{b}.running_var"], sd[f"{b}.weight"],
                         sd[f"{b}.bias"], training=False, eps=1e-5)
        h = F.relu(h)
        out[f"conv{n}"] = h
        if n in (1, 2):
            h = F.max_pool2d(h, 3, 2)
    out["pool5"] = F.max_pool2d(h, 3, 2)
    fc6 = F.relu(F.linear(out["pool5"].flatten(1), sd["classifier.1.weight"], sd["classifier.1.bias"]))
    out["fc7_prerelu"] = F.linear(fc6, sd["classifier.4.weight"], sd["classifier.4.bias"])
    out["logits"] = F.linear(F.relu(out["fc7_prerelu"]), sd["top_layer.weight"], sd["top_layer.bias"])
    return out


def test_alexnet_taps_at_224():
    torch.manual_seed(0)
    m = AlexNet(sobel=True, fc_dim=64, k=7)
    randomise_bn(m)
    m.eval()
    x = torch.randn(2, 3, 224, 224)
    names = ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "fc7_prerelu"]
    with torch.no_grad():
        taps = m.forward_taps(x, names)
        logits = m(x)
        ref = manual_alexnet(m, x)
    shapes = {"conv1": (96, 55, 55), "conv2": (256, 27, 27), "conv3": (384, 13, 13),
              "conv4": (384, 13, 13), "conv5": (256, 13, 13), "pool5": (256, 6, 6),
              "fc7_prerelu": (64,)}
    for n in names:
        assert taps[n].shape == (2, *shapes[n]), n
    # the adaptive pool is the identity at 224: pool5 is conv5 max-pooled (3, 2)
    assert torch.equal(taps["pool5"], F.max_pool2d(taps["conv5"], 3, 2))
    for n in names:
        torch.testing.assert_close(taps[n], ref[n], rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-4, atol=1e-5)
    # conv3 through the module list by hand, same modules, same order: bit-identical
    with torch.no_grad():
        h = m.sobel(x)
        for i in range(11):  # conv1 .. ReLU after conv3 (features 0..10)
            h = m.features[i](h)
    assert torch.equal(taps["conv3"], h)
    with torch.no_grad():  # the clustering feature: fc7 before its ReLU, by the reference
        torch.testing.assert_close(m.embed(x), ref["fc7_prerelu"], rtol=1e-4, atol=1e-5)


def test_forward_taps_rejects_unknown_names():
    torch.manual_seed(0)
    m = AlexNet(sobel=False, fc_dim=16)
    with pytest.raises(ValueError, match="conv9"):
        m.forward_taps(torch.randn(1, 3, 64, 64), ["conv9"])


@pytest.mark.parametrize("cls,conv5,pool5", [(AlexNet, (256, 3, 3), (256, 6, 6)),
                                             (VGG16, (512, 4, 4), (512, 7, 7))])
def test_small_input_64px(cls, conv5, pool5):
    torch.manual_seed(0)
    m = cls(sobel=True, fc_dim=32, k=5).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        taps = m.forward_taps(x, ["conv1", "conv5", "pool5", "fc7"])
        logits = m(x)
    assert taps["conv5"].shape == (3, *conv5)
    assert taps["pool5"].shape == (3, *pool5)
    assert taps["fc7"].shape == (3, 32) and (taps["fc7"] >= 0).all()
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
