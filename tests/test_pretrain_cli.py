"""``python -m pretrain``: bad inputs give exit code 2 and one ``error:`` line, no traceback;
``--help`` documents every setting; the presets resolve to the protocol's values."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.config import PretrainConfig, preset_config

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--k", "2", "--pca-dim", "16", "--fc-dim", "16", "--input-size", "64",
        "--resize-size", "72", "--batch-size", "4", "--workers", "0", "--epochs", "1",
        "--device", "cpu"]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}  # these runs fail fast; keep them light


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one 'error:' line naming every needle, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [part.strip() for ln in res.stderr.splitlines() for part in ln.split("\r")]
    errors = [ln for ln in lines if ln.startswith("error:")]  # tqdm redraws with \r
    assert len(errors) == 1, res.stderr[-3000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def write_pngs(folder: Path, n: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A valid ImageFolder tree with 6 real PNG images in 2 classes."""
    root = tmp_path / "imgs"
    write_pngs(root / "class_a", 3, seed=1)
    write_pngs(root / "class_b", 3, seed=2)
    return root


# --------------------------------------------------------------------------- bad inputs


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "no_such_dir"
    assert_user_error(cli("--data", str(missing), "--out", str(tmp_path / "run"), *TINY),
                      str(missing))
    assert not (tmp_path / "run").exists()


def test_empty_data_dir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(cli("--data", str(empty), "--out", str(tmp_path / "run"), *TINY),
                      str(empty), "no images")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image(tmp_path, image_folder, workers):
    bad = image_folder / "class_a" / "x.JPEG"
    bad.write_bytes(os.urandom(64) + b"definitely not a JPEG")
    args = [a if a != "0" else workers for a in TINY]  # --workers 0 -> --workers N
    assert args[args.index("--workers") + 1] == workers
    assert_user_error(cli("--data", str(image_folder), "--out", str(tmp_path / "run"), *args),
                      str(bad))


def test_k_larger_than_dataset(tmp_path, image_folder):
    args = list(TINY)
    args[args.index("--k") + 1] = "10"
    assert_user_error(cli("--data", str(image_folder), "--out", str(tmp_path / "run"), *args),
                      "--k 10", "N=6")


def test_input_size_too_small_for_alexnet(tmp_path, image_folder):
    args = list(TINY)
    args[args.index("--input-size") + 1] = "32"
    args[args.index("--resize-size") + 1] = "36"
    assert_user_error(cli("--data", str(image_folder), "--out", str(tmp_path / "run"), *args),
                      "--input-size 32")


def test_resume_without_checkpoint(tmp_path, image_folder):
    out = tmp_path / "run"
    res = cli("--data", str(image_folder), "--out", str(out), "--resume", *TINY)
    assert_user_error(res, str(out / "checkpoint.pth"))


def test_resume_from_truncated_checkpoint(tmp_path, image_folder):
    out = tmp_path / "run"
    out.mkdir()
    ck = out / "checkpoint.pth"
    torch.save({"epoch": 1, "state_dict": {"w": torch.randn(256, 256)}}, ck)
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2])
    assert_user_error(cli("--data", str(image_folder), "--out", str(out), "--resume", *TINY),
                      str(ck))


def test_existing_run_without_resume(tmp_path, image_folder):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"an earlier run")
    assert_user_error(cli("--data", str(image_folder), "--out", str(out), *TINY),
                      str(out), "--resume")
    assert (out / "checkpoint.pth").read_bytes() == b"an earlier run"


@pytest.mark.skipif(not FMNIST.is_dir(), reason=f"{FMNIST} not installed")
def test_diverging_loss(tmp_path):
    """A NaN in the weights during epoch 0 (injected from outside, as a diverged step would
    leave it): the loss check stops at the first step with one line naming the flag."""
    out = tmp_path / "run"
    driver = Path(__file__).resolve().parent / "fixtures" / "fault_driver.py"
    res = subprocess.run(
        [sys.executable, str(driver), "poison-early", "0", "KILL", "--", "--dataset",
         "fashion-mnist", "--subset", "64", "--k", "4", "--pca-dim", "16", "--fc-dim", "64",
         "--input-size", "64", "--resize-size", "72", "--batch-size", "16", "--workers", "0",
         "--epochs", "2", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    line = assert_user_error(res, "training loss became nan at epoch 0, iteration 0", "--lr")
    assert "no epoch had finished" in line
    assert not (out / "checkpoint.pth").exists()  # no epoch finished


# --------------------------------------------------------------------------- help, presets


def test_help_documents_every_setting():
    for preset in ([], ["--preset", "demo"]):
        res = cli(*preset, "--help", timeout=60)
        assert res.returncode == 0, res.stderr
        text = res.stdout
        for f in dataclasses.fields(PretrainConfig):
            if f.name == "lr_rule":  # derived from the batch size, not a flag
                continue
            assert "--" + f.name.replace("_", "-") in text, f.name
        for flag in ("--preset", "--out", "--resume"):
            assert flag in text


def test_presets_resolve():
    paper = preset_config("paper")
    assert dataclasses.replace(paper, lr_rule="given") == PretrainConfig()
    assert "0.05 x batch / 256" in paper.lr_rule
    want = dict(arch="alexnet", sobel=True, k=10000, lr=0.05, momentum=0.9, weight_decay=1e-5,
                head_lr=0.05, head_weight_decay=1e-5, batch_size=256, epochs=500, pca_dim=256,
                kmeans_iters=20, input_size=224, resize_size=256, fc_dim=4096,
                sampler="uniform", reassign=1)
    assert {k: getattr(paper, k) for k in want} == want
    demo = preset_config("demo")
    assert demo.dataset == "fashion-clutter" and demo.data is None
    assert demo.batch_size == 64 and demo.lr == demo.head_lr == 0.05 * 64 / 256
    assert preset_config("demo", batch_size=128).lr == 0.025  # the rule follows the batch
    assert preset_config("demo", lr=0.02).lr == 0.02  # a given lr wins
    demo.validate()
    # overrides win, None overrides are ignored, --data replaces the embedded dataset
    d2 = preset_config("demo", k=7, lr=None, data="/some/dir")
    assert (d2.k, d2.lr, d2.data, d2.dataset) == (7, demo.lr, "/some/dir", None)


def test_out_is_a_file(tmp_path, image_folder):
    out = tmp_path / "a_file"
    out.write_text("not a folder")
    assert_user_error(cli("--data", str(image_folder), "--out", str(out), *TINY), str(out))
