"""pretrain.train.run on a tiny Fashion-MNIST run: logs, assignments, checkpoint, exact resume.

References are independent of the code under test: NMI from scikit-learn (geometric average)
on the rows of assignments.bin, labels read straight from the IDX file, key names written out
from PROTOCOLS.md §1, and resumed runs compared bit for bit with an uninterrupted one.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from pretrain.config import PretrainConfig
from pretrain.train import run

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason=f"{FMNIST} not installed "
                                "(apt-get install dataset-fashion-mnist)")

N, K, FC, EPOCHS = 128, 8, 64, 3
TINY = dict(dataset="fashion-mnist", subset=N, k=K, pca_dim=16, fc_dim=FC, input_size=64,
            resize_size=72, batch_size=32, workers=0, epochs=EPOCHS, device="cpu")
CLI_FLAGS = ["--dataset", "fashion-mnist", "--subset", str(N), "--k", str(K), "--pca-dim", "16",
             "--fc-dim", str(FC), "--input-size", "64", "--resize-size", "72",
             "--batch-size", "32", "--workers", "0", "--epochs", str(EPOCHS), "--device", "cpu",
             "--lr", "0.05", "--head-lr", "0.05"]  # as TINY (the CLI's default follows the batch)
LOG_KEYS = {"epoch", "nmi_prev", "nmi_labels", "kmeans_loss", "train_loss", "empty_clusters",
            "seconds"}
TIMING_KEYS = ("seconds", "img_per_s")
ALEXNET_CONV_IDX = (0, 4, 8, 11, 14)
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def cfg(**kw) -> PretrainConfig:
    return PretrainConfig(**(TINY | kw))


def read_log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if ln.strip()]


def read_assignments(out: Path) -> np.ndarray:
    raw = np.fromfile(out / "assignments.bin", dtype=np.int32)
    assert raw.size % N == 0
    return raw.reshape(-1, N)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def fmnist_labels(n: int) -> np.ndarray:
    """First n training labels, straight from the IDX file (magic 0x801, one uint32 dim)."""
    with gzip.open(FMNIST / "train-labels-idx1-ubyte.gz", "rb") as f:
        head = f.read(8)
        assert int.from_bytes(head[:4], "big") == 0x801
        return np.frombuffer(f.read(n), dtype=np.uint8).astype(np.int64)


def load_ck(out: Path) -> dict:
    return torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)


def assert_runs_identical(a: Path, b: Path) -> None:
    """Bit-identical model, optimizer state, assignments and logs (timings aside)."""
    ca, cb = load_ck(a), load_ck(b)
    assert ca["epoch"] == cb["epoch"] == EPOCHS
    assert set(ca["state_dict"]) == set(cb["state_dict"])
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert set(sa) == set(sb) and len(sa) > 0
    for i in sa:
        assert torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]), i
    assert ca["optimizer"]["param_groups"] == cb["optimizer"]["param_groups"]
    assert torch.equal(ca["assign"], cb["assign"])
    assert (a / "assignments.bin").read_bytes() == (b / "assignments.bin").read_bytes()
    la, lb = read_log(a), read_log(b)
    assert [r["epoch"] for r in la] == [r["epoch"] for r in lb] == list(range(EPOCHS))
    assert without_timing(la) == without_timing(lb)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run of EPOCHS epochs."""
    out = tmp_path_factory.mktemp("reference")
    ck = run(cfg(), out)
    assert ck == out / "checkpoint.pth"
    return out


# --------------------------------------------------------------------------- outputs


def test_log_has_one_line_per_epoch(reference):
    rows = read_log(reference)
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    labels = fmnist_labels(N)
    assign = read_assignments(reference)
    for r in rows:
        assert LOG_KEYS <= set(r)
        assert isinstance(r["kmeans_loss"], float) and r["kmeans_loss"] > 0
        assert isinstance(r["train_loss"], float) and np.isfinite(r["train_loss"])
        assert 0 < r["train_loss"] < 2 * np.log(K)
        assert r["empty_clusters"] == K - len(np.unique(assign[r["epoch"]]))
        assert set(r["seconds"]) >= {"features", "pca", "kmeans", "train"}
        assert all(isinstance(v, float) and v >= 0 for v in r["seconds"].values())
        want = normalized_mutual_info_score(labels, assign[r["epoch"]], average_method="geometric")
        assert r["nmi_labels"] == pytest.approx(want, abs=1e-9)
    assert rows[0]["nmi_prev"] is None
    for r in rows[1:]:
        assert isinstance(r["nmi_prev"], float)


def test_assignments_file_and_nmi_prev(reference):
    assign = read_assignments(reference)
    assert assign.shape == (EPOCHS, N)
    assert (reference / "assignments.bin").stat().st_size == EPOCHS * N * 4
    assert assign.min() >= 0 and assign.max() < K
    ck = load_ck(reference)
    assert ck["assign"].dtype == torch.int32
    assert np.array_equal(ck["assign"].numpy(), assign[-1])
    rows = read_log(reference)
    for e in range(1, EPOCHS):
        want = normalized_mutual_info_score(assign[e - 1], assign[e], average_method="geometric")
        assert rows[e]["nmi_prev"] == pytest.approx(want, abs=1e-9), e


def test_checkpoint_has_released_layout_and_optimizer(reference):
    ck = load_ck(reference)
    assert {"epoch", "arch", "state_dict", "optimizer"} <= set(ck)
    assert ck["epoch"] == EPOCHS and ck["arch"] == "alexnet"
    want = set()
    for i in ALEXNET_CONV_IDX:
        want |= {f"features.module.{i}.weight", f"features.module.{i}.bias"}
        want |= {f"features.module.{i + 1}.{s}" for s in BN_KEYS}
    want |= {f"{m}.{s}" for m in ("classifier.1", "classifier.4", "top_layer", "sobel.0",
                                  "sobel.1") for s in ("weight", "bias")}
    sd = ck["state_dict"]
    assert set(sd) == want
    assert sd["top_layer.weight"].shape == (K, FC) and sd["top_layer.bias"].shape == (K,)
    assert sd["classifier.1.weight"].shape == (FC, 9216)
    assert sd["features.module.0.weight"].shape == (96, 2, 11, 11)
    # the Sobel stayed frozen through training
    assert torch.equal(sd["sobel.0.weight"], torch.full((1, 3, 1, 1), 1.0 / 3.0))
    assert torch.equal(sd["sobel.1.weight"][0, 0],
                       torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]]))
    # the body optimizer: momentum 0.9 / wd as configured, one momentum buffer per parameter
    (group,) = ck["optimizer"]["param_groups"]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 1e-5)
    n_body = sum(1 for k in want if k.endswith(("weight", "bias"))
                 and not k.startswith(("sobel.", "top_layer.")))
    assert len(group["params"]) == n_body == len(ck["optimizer"]["state"])

    from pretrain.checkpoint import load_checkpoint

    loaded = load_checkpoint(reference / "checkpoint.pth")
    assert (loaded.spec.arch, loaded.spec.sobel, loaded.spec.fc_dim, loaded.spec.k) == (
        "alexnet", True, FC, K)
    assert loaded.epoch == EPOCHS
    for k, v in loaded.model.state_dict().items():
        key = "features.module." + k[len("features."):] if k.startswith("features.") else k
        assert torch.equal(v, sd[key]), k
    assert json.loads((reference / "config.json").read_text()) == cfg().to_dict()


# --------------------------------------------------------------------------- resume


def test_resume_after_clean_stop_is_exact(reference, tmp_path):
    out = tmp_path / "two_then_three"
    run(cfg(epochs=2), out)
    assert len(read_log(out)) == 2 and read_assignments(out).shape == (2, N)
    run(cfg(), out, resume=True)
    assert_runs_identical(reference, out)


def test_resume_after_sigkill_mid_epoch_is_exact(reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pretrain", *CLI_FLAGS, "--out", str(out)]
    with open(tmp_path / "stderr1.txt", "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 300
            # epoch 0 logged and checkpointed, epoch 1 clustered (its row appended): the
            # process is now inside epoch 1's training pass
            while True:
                assert proc.poll() is None, (tmp_path / "stderr1.txt").read_text()[-2000:]
                assert time.monotonic() < deadline, "the run never reached epoch 1"
                asg = out / "assignments.bin"
                logf = out / "log.jsonl"
                if (asg.exists() and asg.stat().st_size >= 2 * N * 4 and logf.exists()
                        and len(logf.read_text().splitlines()) == 1):
                    break
                time.sleep(0.01)
            time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # the state a crash in epoch 1 leaves: checkpoint of epoch 0 done, one extra row
    assert load_ck(out)["epoch"] == 1
    assert len(read_log(out)) == 1
    assert read_assignments(out).shape[0] == 2

    res = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert Path(res.stdout.strip().splitlines()[-1]) == out / "checkpoint.pth"
    assert_runs_identical(reference, out)


def test_resume_takes_the_new_learning_rate(reference, tmp_path):
    """After a divergence the user resumes with a lower --lr: the saved lr must not win."""
    from pretrain.models import AlexNet
    from pretrain.train import _resume

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    new = cfg(lr=0.01, momentum=0.5, weight_decay=1e-4)
    torch.manual_seed(0)
    model = AlexNet(sobel=True, fc_dim=FC)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=new.lr, momentum=new.momentum,
                          weight_decay=new.weight_decay)
    state = _resume(new, out, model, opt)
    assert state.epoch == EPOCHS
    (group,) = opt.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.5, 1e-4)
    saved = load_ck(reference)["optimizer"]["state"]
    for i, p in enumerate(group["params"]):
        assert torch.equal(opt.state[p]["momentum_buffer"], saved[i]["momentum_buffer"])


def test_resume_refuses_changed_settings(reference, tmp_path):
    from dcbench.core import UserError

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    before = (out / "checkpoint.pth").read_bytes()
    with pytest.raises(UserError) as e:
        run(cfg(k=K + 1, epochs=EPOCHS + 1), out, resume=True)
    assert "k (run 8, now 9)" in str(e.value) and str(out) in str(e.value)
    assert (out / "checkpoint.pth").read_bytes() == before
    assert read_assignments(out).shape == (EPOCHS, N)


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.x = torch.rand(n, 3, 72, 72, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0, i


def test_channels_last_and_bf16_features_match_the_fp32_forward():
    from pretrain.models import ModelSpec, build_model
    from pretrain.train import Speed, extract_features

    torch.manual_seed(0)
    model = build_model(ModelSpec("alexnet", True, 64, None))
    ds = _Images(12)
    with torch.no_grad():  # the plain fp32 NCHW forward, batch by batch of 5
        want = torch.cat([model.eval().embed(ds.x[i:i + 5]) for i in range(0, 12, 5)]).numpy()
    cpu = torch.device("cpu")
    plain = extract_features(model, ds, 5, 0, cpu)
    np.testing.assert_allclose(plain, want, rtol=1e-5, atol=1e-5)
    nhwc = extract_features(model.to(memory_format=torch.channels_last), ds, 5, 0, cpu,
                            speed=Speed(channels_last=True))
    np.testing.assert_allclose(nhwc, want, rtol=1e-4, atol=1e-4)
    bf16 = extract_features(model, ds, 5, 0, cpu, speed=Speed(bf16=True))
    assert bf16.dtype == np.float32
    rel = np.linalg.norm(bf16 - want, axis=1) / np.linalg.norm(want, axis=1)
    assert rel.max() < 0.05  # bf16 keeps 8 bits of mantissa: ~1 % per layer


@pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")
def test_a_bf16_channels_last_run_trains_and_records_its_options(tmp_path):
    cfg = PretrainConfig(**{**TINY, "epochs": 1}, precision="bf16", channels_last=True)
    ckpt = run(cfg, tmp_path / "fast")
    saved = json.loads((tmp_path / "fast" / "config.json").read_text())
    assert saved["precision"] == "bf16" and saved["channels_last"] is True
    run(PretrainConfig(**{**TINY, "epochs": 1}), tmp_path / "plain")
    fast, plain = (json.loads((tmp_path / d / "log.jsonl").read_text().splitlines()[0])
                   for d in ("fast", "plain"))
    assert fast["train_loss"] == pytest.approx(plain["train_loss"], rel=0.02)
    sd = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert all(v.dtype != torch.bfloat16 for v in sd.values())  # weights stay fp32


def test_the_sgd_helper_makes_the_papers_update():
    """Three steps of ``dcbench.core.sgd`` (fused where torch has it) against the update
    written out by hand: v = m v + (g + wd w); w -= lr v (PyTorch's SGD, the authors')."""
    from dcbench.core import sgd
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 300, generator=g)
    grads = [torch.randn(64, 300, generator=g) for _ in range(3)]
    lr, m, wd = 0.05, 0.9, 5e-4
    p = torch.nn.Parameter(w0.clone())
    opt = sgd([p], lr=lr, momentum=m, weight_decay=wd)
    w, v = w0.double(), None
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
        d = grad.double() + wd * w
        v = d if v is None else m * v + d
        w = w - lr * v
    assert torch.allclose(p.detach().double(), w, rtol=0, atol=1e-6)
    assert not torch.allclose(p.detach(), w0, atol=1e-3)  # it moved
