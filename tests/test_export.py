"""``python -m evaluations.export``: files read the way detectron2 / mmengine / torchvision do.

Sources are written independently of the exporter: AlexNet (Sobel) and VGG16 (RGB) in the
authors' released layout by ``tests/fixtures/legacy_checkpoints.py``, ResNet-50 as a seeded
torchvision state dict. Expected keys follow the documented naming rule applied to the source
names; values and network outputs are compared with the source tensors and with independent
forward passes (the fixture's functional forward, torchvision's ResNet-50 / ``vgg16_bn``).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import load_fixture_module
from torch import nn

from dcbench.core import UserError
from evaluations import export as ex
from pretrain.models import ModelSpec, build_model

lc = load_fixture_module("legacy_checkpoints.py", "legacy_checkpoints_fixture")
ROOT = Path(__file__).resolve().parents[1]
FC_DIM = 32
# the released classifier indices of fc6 / fc7, and the pool5 map C x S x S
SRC_FC = {"alexnet": ("classifier.1", "classifier.4"), "vgg16": ("classifier.0", "classifier.3")}
POOL5 = {"alexnet": (256, 6), "vgg16": (512, 7)}
TOL = {"atol": 1e-5, "rtol": 1e-5}


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evaluations.export", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def ours(key: str) -> str:
    """The naming rule from a source name to our module path (released / torchvision)."""
    key = key.replace("features.module.", "features.")
    for old, new in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
        if key.startswith(old):
            key = new + key[len(old):]
    return key


@dataclass
class Case:
    arch: str
    sobel: bool
    fc_dim: int
    src: Path
    arrays: dict[str, np.ndarray]  # source tensors under their source names
    x: torch.Tensor
    ref: dict[str, torch.Tensor]  # conv5 (and fc7_prerelu) of an independent forward
    outs: dict[str, Path] = field(default_factory=dict)
    stdout: dict[str, str] = field(default_factory=dict)

    @property
    def trunk(self) -> dict[str, np.ndarray]:
        """Source trunk tensors under our names (no classifier, top_layer or fc)."""
        return {ours(k): v for k, v in self.arrays.items()
                if not k.startswith(("classifier.", "top_layer.", "fc."))}

    @property
    def fc(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.arrays[f"{n}.weight"], self.arrays[f"{n}.bias"])
                for n in SRC_FC.get(self.arch, ())]

    @property
    def bn_counters(self) -> set[str]:
        """num_batches_tracked of every BN of the trunk (the released files predate them)."""
        return {k[:-len("running_mean")] + "num_batches_tracked" for k in self.trunk
                if k.endswith("running_mean")}

    def fresh(self) -> nn.Module:
        """A newly initialised network of the same shape (other seed than the source)."""
        torch.manual_seed(12345)
        return build_model(ModelSpec(self.arch, self.sobel, self.fc_dim)).eval()


def _released(tmp: Path, arch: str, sobel: bool) -> Case:
    src = tmp / f"{arch}_released.pth"
    arrays = lc.write_released_checkpoint(src, arch, sobel=sobel, fc_dim=FC_DIM, k=7, seed=3)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224) if arch == "alexnet" else torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        ref = lc.functional_forward(arrays, arch, x)
    return Case(arch, sobel, FC_DIM, src, arrays, x, ref)


def _resnet(tmp: Path) -> Case:
    torch.manual_seed(1)
    net = torchvision.models.resnet50(weights=None)
    for m in net.modules():  # non-trivial BN so that running stats matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    src = tmp / "resnet50_tv.pth"
    torch.save({"epoch": 3, "arch": "resnet50", "state_dict": net.state_dict()}, src)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        conv5 = net.layer4(net.layer3(net.layer2(net.layer1(h))))
    arrays = {k: v.numpy() for k, v in net.state_dict().items()}
    return Case("resnet50", False, 2048, src, arrays, x, {"conv5": conv5})


@pytest.fixture(scope="module", params=["alexnet", "vgg16", "resnet50"])
def case(request, tmp_path_factory) -> Case:
    tmp = tmp_path_factory.mktemp(request.param)
    c = _resnet(tmp) if request.param == "resnet50" else (
        _released(tmp, request.param, sobel=request.param == "alexnet"))
    for fmt, name in (("detectron2", "d2.pkl"), ("mmseg", "mmseg.pth"),
                      ("torchvision", "tv.pth")):
        r = run_cli("--ckpt", c.src, "--to", fmt, "--out", tmp / name)
        assert r.returncode == 0, r.stderr
        c.outs[fmt], c.stdout[fmt] = tmp / name, r.stdout
    return c


def _equal(got, want: np.ndarray, key: str) -> None:
    got = got.numpy() if isinstance(got, torch.Tensor) else got
    assert got.shape == want.shape, key
    np.testing.assert_array_equal(got, want, err_msg=key)


def _stdout_ok(c: Case, fmt: str, n_keys: int) -> None:
    lines = c.stdout[fmt].strip().splitlines()
    assert len(lines) == 1 and str(c.outs[fmt]) in lines[0] and f"{n_keys} keys" in lines[0]
    assert f"arch={c.arch}" in lines[0] and f"fc_dim={c.fc_dim}" in lines[0]


def _pool5(c: Case, conv5: torch.Tensor) -> torch.Tensor:
    """The C x S x S pool5 map from conv5 (AlexNet: MaxPool 3/2, VGG16: MaxPool 2/2)."""
    h = F.max_pool2d(conv5, 3, 2) if c.arch == "alexnet" else F.max_pool2d(conv5, 2, 2)
    return F.adaptive_avg_pool2d(h, POOL5[c.arch][1])


class _RecordingUnpickler(pickle.Unpickler):
    """detectron2's ``pickle.load(f, encoding="latin1")``, noting every global it imports."""

    def __init__(self, f):
        super().__init__(f, encoding="latin1")
        self.globals: set[tuple[str, str]] = set()

    def find_class(self, module, name):
        self.globals.add((module, name))
        return super().find_class(module, name)


def test_detectron2(case):
    c = case
    with open(c.outs["detectron2"], "rb") as f:
        u = _RecordingUnpickler(f)
        data = u.load()
    # detectron2 returns the file as is only with these keys, then loads "model" by name
    assert "model" in data and "__author__" in data and data["matching_heuristics"] is False
    # only public constructors: loads under NumPy 1.x as well as 2.x
    assert u.globals <= {("numpy", "ndarray"), ("builtins", "bytearray")}, u.globals
    model = data["model"]
    want = {"backbone." + k: v for k, v in c.trunk.items() if not k.endswith("num_batches_tracked")}
    for name, (w, b) in zip(("fc1", "fc2"), c.fc):
        want[f"roi_heads.box_head.{name}.weight"] = w
        want[f"roi_heads.box_head.{name}.bias"] = b
    assert set(model) == set(want)
    for k, v in model.items():
        assert isinstance(v, np.ndarray) and v.flags.writeable, k
        _equal(v, want[k], k)
    meta = data["dcbench"]
    assert (meta["arch"], meta["sobel"], meta["fc_dim"]) == (c.arch, c.sobel, c.fc_dim)
    assert meta["source_sha256"] == hashlib.sha256(c.src.read_bytes()).hexdigest()
    assert meta["epoch"] == (3 if c.arch == "resnet50" else 500)
    _stdout_ok(c, "detectron2", len(want))

    # a detectron2-like model: a custom backbone holding our trunk modules + FastRCNNConvFCHead
    net = c.fresh()
    root, backbone, roi, head = nn.Module(), nn.Module(), nn.Module(), nn.Module()
    for name in {k.split(".")[0] for k in c.trunk}:
        setattr(backbone, name, getattr(net, name))
    root.backbone, root.roi_heads, roi.box_head = backbone, roi, head
    if c.fc:
        ch, s = POOL5[c.arch]
        head.fc1, head.fc2 = nn.Linear(ch * s * s, c.fc_dim), nn.Linear(c.fc_dim, c.fc_dim)
    inc = root.load_state_dict({k: torch.from_numpy(v) for k, v in model.items()}, strict=False)
    assert not inc.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in inc.missing_keys), inc.missing_keys
    with torch.no_grad():
        conv5 = net.forward_taps(c.x, ["conv5"])["conv5"]
        torch.testing.assert_close(conv5, c.ref["conv5"], **TOL)
        if c.fc:  # FastRCNNConvFCHead: flatten, then relu(fc1), relu(fc2)
            h = torch.flatten(_pool5(c, conv5), 1)
            h = head.fc2(F.relu(head.fc1(h)))
            torch.testing.assert_close(h, c.ref["fc7_prerelu"], **TOL)


def test_mmseg(case):
    c = case
    with open(c.outs["mmseg"], "rb") as f:
        ckpt = torch.load(f, map_location="cpu", weights_only=True)
    meta = ckpt["meta"]
    assert (meta["arch"], meta["sobel"], meta["fc_dim"]) == (c.arch, c.sobel, c.fc_dim)
    sd = {re.sub(r"^module\.", "", k): v for k, v in ckpt["state_dict"].items()}  # mmengine
    fc_keys = {f"fc{n}.{p}" for n in (6, 7) for p in ("weight", "bias")} if c.fc else set()
    assert set(sd) == set(c.trunk) | c.bn_counters | fc_keys
    for k, v in c.trunk.items():
        _equal(sd[k], v, k)
    _stdout_ok(c, "mmseg", len(sd))

    net = c.fresh()
    inc = net.load_state_dict(sd, strict=False)  # PretrainedInit: strict=False
    assert set(inc.unexpected_keys) == fc_keys
    assert all(k.startswith("classifier.") for k in inc.missing_keys), inc.missing_keys
    with torch.no_grad():
        taps = net.forward_taps(c.x, ["conv5"] + (["pool5"] if c.fc else []))
        torch.testing.assert_close(taps["conv5"], c.ref["conv5"], **TOL)
    if not c.fc:
        return
    (w6, b6), (w7, b7) = c.fc
    ch, s = POOL5[c.arch]
    assert tuple(sd["fc6.weight"].shape) == (c.fc_dim, ch, s, s)
    assert tuple(sd["fc7.weight"].shape) == (c.fc_dim, c.fc_dim, 1, 1)
    _equal(sd["fc6.bias"], b6, "fc6.bias")
    _equal(sd["fc7.bias"], b7, "fc7.bias")
    for o, i, y, x in [(0, 0, 0, 0), (3, 5, 2, 4), (c.fc_dim - 1, ch - 1, s - 1, s - 1)]:
        assert sd["fc6.weight"][o, i, y, x].item() == w6[o, i * s * s + y * s + x]
    _equal(sd["fc7.weight"][:, :, 0, 0], w7, "fc7.weight")
    pool5 = taps["pool5"]
    with torch.no_grad():
        conv6 = F.conv2d(pool5, sd["fc6.weight"], sd["fc6.bias"])
        linear6 = F.linear(pool5.flatten(1), torch.from_numpy(w6), torch.from_numpy(b6))
        torch.testing.assert_close(conv6.flatten(1), linear6, **TOL)
        conv7 = F.conv2d(F.relu(conv6), sd["fc7.weight"], sd["fc7.bias"])
        torch.testing.assert_close(conv7.flatten(1), c.ref["fc7_prerelu"], **TOL)


def test_torchvision(case):
    c = case
    sd = torch.load(c.outs["torchvision"], map_location="cpu", weights_only=True)
    assert type(sd) is dict and all(type(v) is torch.Tensor for v in sd.values())
    want = dict(c.trunk)
    for name, (w, b) in zip(SRC_FC.get(c.arch, ()), c.fc):
        want[f"{name}.weight"], want[f"{name}.bias"] = w, b
    assert set(sd) == set(want) | c.bn_counters
    spec = ModelSpec(c.arch, c.sobel, c.fc_dim)
    assert set(sd) == set(build_model(spec).state_dict())
    for k, v in want.items():
        _equal(sd[k], v, k)
    _stdout_ok(c, "torchvision", len(sd))

    net = c.fresh()
    net.load_state_dict(sd, strict=True)
    taps = ["conv5"] + (["fc7_prerelu"] if c.fc else [])
    with torch.no_grad():
        got = net.forward_taps(c.x, taps)
    for t in taps:
        torch.testing.assert_close(got[t], c.ref[t], **TOL)
    if c.arch == "vgg16":  # torchvision's own vgg16_bn features take the keys as they are
        tv = torchvision.models.vgg16_bn(weights=None).features.eval()
        tv.load_state_dict({k[len("features."):]: v for k, v in sd.items()
                            if k.startswith("features.")}, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(tv[:-1](c.x), c.ref["conv5"], **TOL)


# ----------------------------------------------------------------------------- hostile inputs


@pytest.fixture(scope="module")
def small_src(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "alexnet.pth"
    lc.write_released_checkpoint(path, "alexnet", sobel=True, fc_dim=8, k=3, seed=4)
    return path


def test_truncated_checkpoint(small_src, tmp_path):
    bad = tmp_path / "cut.pth"
    bad.write_bytes(small_src.read_bytes()[: small_src.stat().st_size // 2])
    out = tmp_path / "o" / "x.pkl"
    out.parent.mkdir()
    r = run_cli("--ckpt", bad, "--to", "detectron2", "--out", out)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export: ") and str(bad) in lines[0]
    assert os.listdir(out.parent) == []


def test_unknown_format(small_src, tmp_path):
    r = run_cli("--ckpt", small_src, "--to", "onnx", "--out", tmp_path / "x.pth")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("what", ["missing_parent", "directory", "same_as_input",
                                  "d2_not_pkl", "missing_ckpt"])
def test_bad_paths(what, small_src, tmp_path, capsys):
    src = tmp_path / "in.pth"
    src.write_bytes(small_src.read_bytes())
    before = src.read_bytes()
    out, fmt = {"missing_parent": (tmp_path / "nope" / "x.pth", "mmseg"),
                "directory": (tmp_path, "torchvision"),
                "same_as_input": (src, "torchvision"),
                "d2_not_pkl": (tmp_path / "x.pth", "detectron2"),
                "missing_ckpt": (tmp_path / "x.pth", "mmseg")}[what]
    if what == "missing_ckpt":
        src = tmp_path / "absent.pth"
    assert ex.main(["--ckpt", str(src), "--to", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export: ")
    assert sorted(os.listdir(tmp_path)) == ["in.pth"]
    assert (tmp_path / "in.pth").read_bytes() == before


@pytest.mark.parametrize("fmt", ex.FORMATS)
def test_crash_mid_write_leaves_nothing(fmt, small_src, tmp_path, monkeypatch):
    """A write that fails half-way leaves neither the output nor a temp file."""
    def half_then_fail(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    class FailingPickler:
        def __init__(self, f, protocol):
            self.f = f

        def dump(self, obj):
            half_then_fail(obj, self.f)

    monkeypatch.setattr(ex, "_PortablePickler", FailingPickler)
    monkeypatch.setattr(torch, "save", half_then_fail)
    ckpt = ex.load_checkpoint(small_src)
    out = tmp_path / ("x.pkl" if fmt == "detectron2" else "x.pth")
    with pytest.raises(UserError, match="no space left"):
        ex.export(ckpt, fmt, out)
    assert os.listdir(tmp_path) == []
