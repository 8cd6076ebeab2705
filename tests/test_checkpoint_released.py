"""The authors' released checkpoints as published (PyTorch 0.3, Python 2.7) load and evaluate.

The files are written by ``tests/fixtures/legacy_checkpoints.py`` opcode by opcode in the
legacy (non-zip) serialization -- not with torch.save, not with this project's writer, not from
a ``state_dict()`` -- with Python 2 byte strings, ``_rebuild_tensor`` (v1), CUDA storages and no
``num_batches_tracked``; outputs are compared with a functional forward over the same arrays.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_fixture_module
from dcbench.core import UserError
from pretrain.checkpoint import load_checkpoint

lc = load_fixture_module("legacy_checkpoints.py", "legacy_checkpoints_fixture")
SIZE = {"alexnet": 64, "vgg16": 32}


def _check_loads_exactly(path, written: dict, arch: str, k: int | None):
    ck = load_checkpoint(path)
    sd_keys = [key for key in written if not key.startswith("optimizer.")]
    assert ck.kind == "released" and ck.epoch == 500
    assert (ck.spec.arch, ck.spec.sobel, ck.spec.k) == (arch, True, k)
    assert ck.keys_used == len(sd_keys)  # every key of the file went into the model
    n_bn = 5 if arch == "alexnet" else 13
    assert len(ck.filled) == n_bn and all(f.endswith("num_batches_tracked") for f in ck.filled)
    sd = ck.model.state_dict()
    for key in sd_keys:  # every value as written
        ours = key.replace("features.module.", "features.")
        assert torch.equal(sd[ours], torch.from_numpy(written[key])), key
    x = torch.randn(2, 3, SIZE[arch], SIZE[arch], generator=torch.Generator().manual_seed(0))
    ref = lc.functional_forward(written, arch, x)
    model = ck.model.eval()
    with torch.no_grad():
        taps = model.forward_taps(x, ["conv1", "conv2", "conv3", "conv4", "conv5", "fc7_prerelu",
                                      "fc7"])
        for name in taps:
            torch.testing.assert_close(taps[name], ref[name], rtol=1e-5, atol=1e-5, msg=name)
        if k is not None:
            torch.testing.assert_close(model(x), ref["top"], rtol=1e-5, atol=1e-5)
    return ck


@pytest.mark.parametrize("arch", ["alexnet", "vgg16"])
@pytest.mark.parametrize("with_optimizer", [False, True])
@pytest.mark.parametrize("py2", [True, False])
def test_released_files_as_published_load_and_evaluate(tmp_path, arch, with_optimizer, py2):
    path = tmp_path / f"{arch}.pth.tar"
    written = lc.write_released_checkpoint(path, arch, fc_dim=32, k=7, py2=py2,
                                           with_optimizer=with_optimizer, seed=1)
    assert path.read_bytes()[:2] == b"\x80\x02"  # a protocol-2 pickle, not a zip archive
    _check_loads_exactly(path, written, arch, 7)


def test_released_alexnet_at_paper_width(tmp_path):
    """fc 4096 and k = 10,000 as released: 61M + 41M values."""
    path = tmp_path / "checkpoint.pth.tar"
    written = lc.write_released_checkpoint(path, "alexnet", fc_dim=4096, k=10000, seed=2)
    ck = _check_loads_exactly(path, written, "alexnet", 10000)
    # 5 convs x 2 + 5 BN x 4 + fc6, fc7 x 2 + top_layer x 2 + sobel x 4 = 40
    assert ck.spec.fc_dim == 4096 and ck.keys_used == 40


def test_without_top_layer_and_without_sobel(tmp_path):
    path = tmp_path / "trunk.pth"
    written = lc.write_released_checkpoint(path, "alexnet", sobel=False, fc_dim=32, k=None)
    ck = load_checkpoint(path)
    assert ck.spec.sobel is False and ck.spec.k is None and ck.model.top_layer is None
    assert ck.keys_used == len(written)


def test_a_python2_int_pickle_needs_trust_and_says_why(tmp_path):
    """Python 2.7 pickled 64-bit id() values (the optimizer's param ids) with the text INT
    opcode, which the safe loader does not read: one message, and --trust-pickle opts in."""
    path = tmp_path / "with_ids.pth"
    written = lc.write_released_checkpoint(path, "alexnet", fc_dim=32, k=7,
                                           with_optimizer=True, py2_native_int_ids=True)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "--trust-pickle" in msg and "runs code" in msg
    ck = load_checkpoint(path, trust_pickle=True)
    assert ck.keys_used == len([k for k in written if not k.startswith("optimizer.")])


def test_a_pickled_object_is_refused_without_trust(tmp_path):
    import argparse

    path = tmp_path / "namespace.pth"
    good = lc.write_released_checkpoint(tmp_path / "g.pth", "alexnet", fc_dim=32, k=7)
    sd = {k: torch.from_numpy(v) for k, v in good.items()}
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.05)}, path)
    with pytest.raises(UserError, match="argparse.Namespace"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust_pickle=True).spec.arch == "alexnet"


@pytest.mark.parametrize("cut", [0.999, 0.5, 0.01])
def test_truncated_released_file_is_one_clear_error(tmp_path, cut):
    path = tmp_path / "checkpoint.pth.tar"
    lc.write_released_checkpoint(path, "alexnet", fc_dim=32, k=7)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "truncated, corrupt or not a PyTorch checkpoint" in msg
    assert "--trust-pickle" not in msg  # a cut file is not an object-holding file


def test_missing_buffer_other_than_num_batches_tracked_is_still_an_error(tmp_path):
    """Only num_batches_tracked may be absent: a missing running_var is named."""
    good = lc.write_released_checkpoint(tmp_path / "g.pth", "alexnet", fc_dim=32, k=7)
    sd = {k: torch.from_numpy(v) for k, v in good.items() if k != "features.module.5.running_var"}
    sd["classifier.9.weight"] = torch.zeros(2)
    path = tmp_path / "edited.pth"
    torch.save({"epoch": 1, "arch": "alexnet", "state_dict": sd}, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "features.5.running_var" in msg and "classifier.9.weight" in msg
    assert "num_batches_tracked" not in msg and str(path) in msg


def test_bytes_are_deterministic(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    lc.write_released_checkpoint(a, "vgg16", fc_dim=32, k=7)
    lc.write_released_checkpoint(b, "vgg16", fc_dim=32, k=7)
    assert a.read_bytes() == b.read_bytes()
    assert np.frombuffer(a.read_bytes()[-16:], np.uint8).size == 16
