"""Tests of the synthetic DeepCluster release checkpoints (tests/fixtures/legacy_checkpoints.py).

They check the fixture against ``torch.load`` itself, not against project code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import itertools
import pickle
import pickletools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

_PATH = Path(__file__).parent / "fixtures" / "legacy_checkpoints.py"
_spec = importlib.util.spec_from_file_location("legacy_checkpoints_fixture", _PATH)
lc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = lc
_spec.loader.exec_module(lc)

SMALL = {"fc_dim": 32, "k": 7}


def _object_pickle_ops(path: Path) -> list[tuple[str, object]]:
    """Opcodes ``(name, arg)`` of the 4th pickle (the checkpoint object)."""
    data = path.read_bytes()
    f = io.BytesIO(data)
    for _ in range(3):  # magic, protocol version, sys_info
        pickle.load(f)
    return [(op.name, arg) for op, arg, _ in pickletools.genops(data[f.tell():])]


def _assert_matches(ckpt: dict, written: dict[str, np.ndarray]) -> None:
    sd = ckpt["state_dict"]
    state_keys = [k for k in written if not k.startswith("optimizer.")]
    assert list(sd) == state_keys
    for key, t in sd.items():
        assert type(key) is str
        expected = torch.from_numpy(written[key])
        assert t.dtype == expected.dtype and t.shape == expected.shape, key
        assert torch.equal(t, expected), key
    if "optimizer" in ckpt:
        opt = ckpt["optimizer"]
        ids = opt["param_groups"][0]["params"]
        assert sorted(opt["state"]) == sorted(ids)
        for pid in ids:
            expected = torch.from_numpy(written[f"optimizer.state.{pid}.momentum_buffer"])
            assert torch.equal(opt["state"][pid]["momentum_buffer"], expected)


@pytest.mark.parametrize(
    "arch,py2,with_optimizer,nbt",
    list(itertools.product(["alexnet", "vgg16"], [True, False], [False, True], [False, True])),
)
def test_every_variant_loads_weights_only(tmp_path, arch, py2, with_optimizer, nbt):
    path = tmp_path / "ckpt.pth"
    written = lc.write_released_checkpoint(
        path, arch, with_optimizer=with_optimizer, num_batches_tracked=nbt, py2=py2, **SMALL
    )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"epoch", "arch", "state_dict"} | ({"optimizer"} if with_optimizer else set())
    assert ckpt["epoch"] == 500 and ckpt["arch"] == arch
    assert type(ckpt["state_dict"]).__name__ == "OrderedDict"
    _assert_matches(ckpt, written)
    sd = ckpt["state_dict"]
    assert sd["top_layer.weight"].shape == (7, 32)
    assert sd["features.module.0.weight"].shape[1] == 2
    assert ("features.module.1.num_batches_tracked" in sd) == nbt
    if nbt:
        assert sd["features.module.1.num_batches_tracked"].dtype == torch.int64
        assert sd["features.module.1.num_batches_tracked"].dim() == 0
    if with_optimizer:
        group = ckpt["optimizer"]["param_groups"][0]
        assert group["lr"] == 0.05 and group["momentum"] == 0.9 and group["nesterov"] is False
        n_trainable = sum(1 for k in sd if not k.startswith(("top_layer", "sobel")) and "running" not in k
                          and "num_batches" not in k)
        assert len(group["params"]) == n_trainable


def test_no_sobel_no_top_layer(tmp_path):
    path = tmp_path / "ckpt.pth"
    written = lc.write_released_checkpoint(path, "alexnet", sobel=False, fc_dim=32, k=None)
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert sd["features.module.0.weight"].shape == (96, 3, 11, 11)
    assert not any(k.startswith(("sobel", "top_layer")) for k in sd)
    assert sd["classifier.1.weight"].shape == (32, 9216)
    _assert_matches({"state_dict": sd}, written)


def test_values_are_non_default_and_sobel_exact(tmp_path):
    written = lc.write_released_checkpoint(tmp_path / "c.pth", "vgg16", **SMALL)
    assert written["features.module.1.running_var"].min() >= 0.5
    assert not np.allclose(written["features.module.1.running_mean"], 0)
    assert not np.allclose(written["features.module.1.running_var"], 1)
    np.testing.assert_array_equal(written["sobel.0.weight"], np.full((1, 3, 1, 1), 1 / 3, np.float32))
    np.testing.assert_array_equal(
        written["sobel.1.weight"][1, 0], [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]
    )
    assert written["classifier.0.weight"].shape == (32, 25088)
    assert [k for k in written if k.endswith(".weight") and k.startswith("features")][:4] == [
        "features.module.0.weight", "features.module.1.weight",
        "features.module.3.weight", "features.module.4.weight",
    ]


def test_bytes_are_deterministic(tmp_path):
    digests = set()
    for name in ("a.pth", "b.pth"):
        lc.write_released_checkpoint(tmp_path / name, "alexnet", with_optimizer=True, **SMALL)
        digests.add(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert len(digests) == 1
    lc.write_released_checkpoint(tmp_path / "c.pth", "alexnet", with_optimizer=True, seed=1, **SMALL)
    assert hashlib.sha256((tmp_path / "c.pth").read_bytes()).hexdigest() not in digests


def test_py2_opcodes(tmp_path):
    path = tmp_path / "py2.pth"
    lc.write_released_checkpoint(path, "alexnet", with_optimizer=True, **SMALL)
    ops = _object_pickle_ops(path)
    names = {name for name, _ in ops}
    globals_ = {arg for name, arg in ops if name == "GLOBAL"}
    assert "SHORT_BINSTRING" in names and "BINUNICODE" not in names
    assert globals_ == {"torch._utils _rebuild_tensor", "torch.cuda FloatStorage", "collections OrderedDict"}
    assert not any("_rebuild_tensor_v2" in str(arg) for _, arg in ops)
    assert ("SHORT_BINSTRING", "features.module.0.weight") in ops
    assert "LONG1" in names  # optimizer param ids (default, weights_only-compatible)
    # py2 OrderedDict: GLOBAL, then a list of [key, value] lists, TUPLE1, REDUCE
    i = ops.index(("GLOBAL", "collections OrderedDict"))
    assert [n for n, _ in ops[i + 1:i + 6]] == ["BINPUT", "EMPTY_LIST", "BINPUT", "MARK", "EMPTY_LIST"]
    # the magic number header
    data = path.read_bytes()
    f = io.BytesIO(data)
    assert pickle.load(f) == 0x1950A86A20F9469CFC6C and pickle.load(f) == 1001
    assert pickle.load(f) == {"protocol_version": 1001, "little_endian": True,
                              "type_sizes": {"short": 2, "int": 4, "long": 8}}


def test_py3_opcodes_and_int64_storage(tmp_path):
    path = tmp_path / "py3.pth"
    lc.write_released_checkpoint(path, "alexnet", py2=False, num_batches_tracked=True, **SMALL)
    ops = _object_pickle_ops(path)
    names = {name for name, _ in ops}
    assert "BINUNICODE" in names and "SHORT_BINSTRING" not in names
    assert ("GLOBAL", "torch.cuda LongStorage") in ops
    i = ops.index(("GLOBAL", "collections OrderedDict"))
    assert [n for n, _ in ops[i + 1:i + 4]] == ["BINPUT", "EMPTY_TUPLE", "REDUCE"]


def test_py2_native_int_ids_need_full_unpickler(tmp_path):
    """Real Python 2 pickled 64-bit id() values with the text INT opcode."""
    path = tmp_path / "py2int.pth"
    written = lc.write_released_checkpoint(
        path, "alexnet", with_optimizer=True, py2_native_int_ids=True, **SMALL
    )
    ops = _object_pickle_ops(path)
    assert ("INT", 140000000000000) in ops and "LONG1" not in {n for n, _ in ops}
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    _assert_matches(ckpt, written)


def test_needs_map_location_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: cuda:0 storages load without map_location")
    path = tmp_path / "c.pth"
    lc.write_released_checkpoint(path, "alexnet", **SMALL)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)


def _reference_modules(arch: str, fc_dim: int, k: int) -> nn.Module:
    """Independent nn.Module twin of the released model (DeepCluster layout)."""
    layers: list[nn.Module] = []
    cin = 2
    if arch == "alexnet":
        cfg = [(96, 11, 4, 2), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1), "M"]
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(3, 2))
            else:
                cout, ks, s, p = v
                layers += [nn.Conv2d(cin, cout, ks, s, p), nn.BatchNorm2d(cout), nn.ReLU()]
                cin = cout
        classifier = nn.Sequential(nn.Dropout(), nn.Linear(9216, fc_dim), nn.ReLU(),
                                   nn.Dropout(), nn.Linear(fc_dim, fc_dim), nn.ReLU())
        pool = 6
    else:
        for v in lc._VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        classifier = nn.Sequential(nn.Linear(25088, fc_dim), nn.ReLU(), nn.Dropout(),
                                   nn.Linear(fc_dim, fc_dim), nn.ReLU())
        pool = 7
    m = nn.Module()
    m.features = nn.Sequential(*layers)
    m.pool = nn.AdaptiveAvgPool2d(pool)
    m.classifier = classifier
    m.top_layer = nn.Linear(fc_dim, k)
    m.sobel = nn.Sequential(nn.Conv2d(3, 1, 1), nn.Conv2d(1, 2, 3, padding=1))
    return m.eval()


@pytest.mark.parametrize("arch,size", [("alexnet", 99), ("vgg16", 32)])
def test_functional_forward_matches_modules(tmp_path, arch, size):
    path = tmp_path / "c.pth"
    written = lc.write_released_checkpoint(path, arch, num_batches_tracked=True, **SMALL)
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    m = _reference_modules(arch, 32, 7)
    m.load_state_dict({k.replace("features.module.", "features."): v for k, v in sd.items()})
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))

    out = lc.functional_forward(written, arch, x)

    with torch.no_grad():
        h = m.sobel(x)
        relus, before_pool = [], []
        for layer in m.features:
            if isinstance(layer, nn.MaxPool2d):
                before_pool.append(h)
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                relus.append(h)
        h = m.classifier(m.pool(h).flatten(1))
        top = m.top_layer(h)
    convs = relus if arch == "alexnet" else before_pool
    assert len(convs) == 5
    assert set(out) == {"conv1", "conv2", "conv3", "conv4", "conv5", "fc7_prerelu", "fc7", "top"}
    for n, expected in enumerate(convs, 1):
        torch.testing.assert_close(out[f"conv{n}"], expected)
    torch.testing.assert_close(out["fc7"], h)
    torch.testing.assert_close(out["fc7"], out["fc7_prerelu"].clamp_min(0))
    torch.testing.assert_close(out["top"], top)


def test_full_size_alexnet_with_optimizer(tmp_path):
    """Release-sized AlexNet (fc 4096, k 10000) + SGD state: ~630 MB, ~6 s to write."""
    path = tmp_path / "full.pth"
    written = lc.write_released_checkpoint(path, "alexnet", with_optimizer=True)
    n_elems = sum(a.size for a in written.values())
    assert path.stat().st_size > 4 * n_elems
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    assert sd["top_layer.weight"].shape == (10000, 4096)
    assert torch.equal(sd["top_layer.weight"], torch.from_numpy(written["top_layer.weight"]))
    assert torch.equal(sd["classifier.1.weight"], torch.from_numpy(written["classifier.1.weight"]))
    path.unlink()
