"""pretrain.checkpoint: the authors' released layout loads exactly; bad files fail clearly.

The released-format files are written here by hand (``features.`` -> ``features.module.``,
``{'epoch', 'arch', 'state_dict'}``, no optimizer), not with the module's own writer.
"""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.checkpoint import load_checkpoint
from dcbench.core import UserError
from pretrain.models import AlexNet, VGG16


def randomise_buffers(model: nn.Module, seed: int) -> None:
    """Non-default BN statistics (so that a load that drops buffers would show)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.num_batches_tracked.fill_(1234)


def released_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The authors' key layout: only ``features`` was wrapped in DataParallel."""
    out = {}
    for k, v in model.state_dict().items():
        out[("features.module." + k[len("features."):]) if k.startswith("features.") else k] = v
    return out


def save_released(model: nn.Module, arch: str, path: Path, epoch: int = 200) -> Path:
    torch.save({"epoch": epoch, "arch": arch, "state_dict": released_state_dict(model)}, path)
    return path


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def assert_same_model(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k
    ya, yb = outputs(a, x), outputs(b, x)
    assert torch.equal(ya, yb)


@pytest.fixture(scope="module")
def small_alexnet() -> AlexNet:
    torch.manual_seed(3)
    m = AlexNet(sobel=True, fc_dim=16, k=5)
    randomise_buffers(m, 3)
    return m


@pytest.fixture(scope="module")
def small_released(tmp_path_factory, small_alexnet) -> Path:
    return save_released(small_alexnet, "alexnet",
                         tmp_path_factory.mktemp("ck") / "alexnet_small.pth")


# --------------------------------------------------------------------------- exact loads


def test_released_alexnet_4096_loads_exactly(tmp_path):
    torch.manual_seed(0)
    model = AlexNet(sobel=True, fc_dim=4096, k=37)
    randomise_buffers(model, 0)
    path = save_released(model, "alexnet", tmp_path / "checkpoint.pth.tar", epoch=500)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"epoch", "arch", "state_dict"}
    assert "features.module.0.weight" in raw["state_dict"]
    assert "features.0.weight" not in raw["state_dict"]
    assert raw["state_dict"]["top_layer.weight"].shape == (37, 4096)

    ck = load_checkpoint(path)
    assert ck.spec.arch == "alexnet" and ck.spec.sobel is True
    assert ck.spec.fc_dim == 4096
    assert ck.spec.k == 37  # from the rows of top_layer.bias
    assert ck.epoch == 500 and ck.kind == "released"
    assert ck.model.top_layer.weight.shape == (37, 4096)
    x = torch.randn(2, 3, 64, 64)
    assert_same_model(model, ck.model, x)
    with torch.no_grad():
        assert torch.equal(model.embed(x), ck.model.embed(x))


def test_dataparallel_prefixed_state_dict_loads_exactly(tmp_path, small_alexnet):
    sd = nn.DataParallel(small_alexnet).state_dict()
    assert all(k.startswith("module.") for k in sd)
    path = tmp_path / "dp.pth"
    torch.save(sd, path)
    ck = load_checkpoint(path)
    assert ck.spec.arch == "alexnet" and ck.spec.sobel and ck.spec.k == 5
    assert_same_model(small_alexnet, ck.model, torch.randn(2, 3, 64, 64))
    # the same, wrapped as {'state_dict': ...} with the released inner prefix as well
    sd2 = {"module." + k: v for k, v in released_state_dict(small_alexnet).items()}
    torch.save({"epoch": 3, "arch": "alexnet", "state_dict": sd2}, path)
    assert_same_model(small_alexnet, load_checkpoint(path).model, torch.randn(2, 3, 64, 64))


def test_checkpoint_without_sobel(tmp_path):
    torch.manual_seed(4)
    model = AlexNet(sobel=False, fc_dim=16, k=3)
    randomise_buffers(model, 4)
    path = save_released(model, "alexnet", tmp_path / "nosobel.pth")
    assert "sobel.0.weight" not in torch.load(path, weights_only=True)["state_dict"]
    ck = load_checkpoint(path)
    assert ck.spec.sobel is False and ck.model.sobel is None
    assert ck.model.features[0].weight.shape == (96, 3, 11, 11)
    assert ck.spec.k == 3
    assert_same_model(model, ck.model, torch.randn(2, 3, 64, 64))


def test_released_vgg16_loads_exactly(tmp_path):
    torch.manual_seed(5)
    model = VGG16(sobel=True, fc_dim=16, k=4)
    randomise_buffers(model, 5)
    path = save_released(model, "vgg16", tmp_path / "vgg.pth")
    ck = load_checkpoint(path)
    assert (ck.spec.arch, ck.spec.sobel, ck.spec.fc_dim, ck.spec.k) == ("vgg16", True, 16, 4)
    assert_same_model(model, ck.model, torch.randn(1, 3, 32, 32))
    # explicit arch mismatch: one clear error naming the file
    with pytest.raises(UserError) as e:
        load_checkpoint(path, arch="alexnet")
    assert str(path) in str(e.value) and "vgg16" in str(e.value)


# --------------------------------------------------------------------------- key coverage


def edited(src: Path, dst: Path, edit) -> Path:
    obj = torch.load(src, weights_only=True)
    edit(obj["state_dict"])
    torch.save(obj, dst)
    return dst


def test_missing_backbone_key(tmp_path, small_released):
    path = edited(small_released, tmp_path / "missing.pth",
                  lambda sd: sd.pop("features.module.9.running_var"))
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert "features.9.running_var" in str(e.value) and str(path) in str(e.value)
    assert "missing" in str(e.value)
    # a conv weight missing from a file that declares its architecture
    path = edited(small_released, tmp_path / "missing_conv.pth",
                  lambda sd: sd.pop("features.module.8.weight"))
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert "features.8.weight" in str(e.value) and str(path) in str(e.value)


def test_unexpected_key(tmp_path, small_released):
    path = edited(small_released, tmp_path / "unexpected.pth",
                  lambda sd: sd.__setitem__("classifier.7.weight", torch.zeros(3)))
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert "classifier.7.weight" in str(e.value) and "unexpected" in str(e.value)
    assert str(path) in str(e.value)


def test_wrong_shape(tmp_path, small_released):
    path = edited(small_released, tmp_path / "shape.pth",
                  lambda sd: sd.__setitem__("features.module.4.weight", torch.zeros(256, 96, 3, 3)))
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "features.4.weight" in msg and "(256, 96, 3, 3)" in msg and "(256, 96, 5, 5)" in msg
    assert str(path) in msg


# --------------------------------------------------------------------------- bad files


def test_truncated_file(tmp_path, small_released):
    data = small_released.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_text_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("this is not a checkpoint\n" * 20)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_pickled_list(tmp_path):
    path = tmp_path / "list.pth"
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "list" in str(e.value)


def test_dict_without_tensors(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "arch": "alexnet"}, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_missing_path(tmp_path):
    path = tmp_path / "nope" / "checkpoint.pth"
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_bare_state_dict_of_no_known_architecture(tmp_path, small_alexnet):
    sd = dict(small_alexnet.state_dict())
    sd.pop("features.8.weight")  # 4 convs: neither AlexNet nor VGG16, and no 'arch' to say
    path = tmp_path / "four_convs.pth"
    torch.save(sd, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "4 conv" in str(e.value)


def test_a_requeue_signal_during_a_checkpoint_save_is_handled_once_the_file_is_whole(
        tmp_path, monkeypatch):
    """submitit's USR2 handler checkpoints, requeues and calls sys.exit. Arriving in the middle
    of torch.save, it left torch's own "unexpected pos" RuntimeError, which became the job's
    result: the run failed although its requeue had been issued. Now the save finishes, the
    handler runs after it, once, and the file on disk is whole."""
    import signal

    from pretrain import checkpoint as ck

    calls, sent = [], []

    def exit_like_submitit(signum, frame):
        calls.append(signum)
        sys.exit(-1)

    write = ck._WriteErrors.write

    def write_then_signal(self, data):
        n = write(self, data)
        if not sent:  # the signal lands in the middle of the first record's writes
            sent.append(1)
            os.kill(os.getpid(), signal.SIGUSR2)
        return n

    monkeypatch.setattr(ck._WriteErrors, "write", write_then_signal)
    obj = {"w": torch.randn(512, 512), "b": torch.arange(10)}
    old = signal.signal(signal.SIGUSR2, exit_like_submitit)
    try:
        with pytest.raises(SystemExit):
            ck.atomic_torch_save(obj, tmp_path / "c.pth")
        assert signal.getsignal(signal.SIGUSR2) is exit_like_submitit  # restored
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert sent and calls == [signal.SIGUSR2]
    back = torch.load(tmp_path / "c.pth", map_location="cpu", weights_only=True)
    assert torch.equal(back["w"], obj["w"]) and torch.equal(back["b"], obj["b"])
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # no temp file left
