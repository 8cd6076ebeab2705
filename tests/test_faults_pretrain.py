"""Fault injection for pretraining: SIGKILL, SIGTERM and SIGINT at each phase of an epoch
(features, clustering, training, saving), two processes on one run folder, broken weights,
a full disk, an unwritable folder; after each, resume gives the uninterrupted run's numbers,
no temp file or lock is left, and the message is one clear line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "fixtures" / "fault_driver.py"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")

FLAGS = ["--preset", "demo", "--subset", "96", "--k", "6", "--pca-dim", "8", "--fc-dim", "32",
         "--batch-size", "32", "--epochs", "3", "--workers", "0", "--device", "cpu"]


def pretrain(out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain", *FLAGS, "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def error_lines(p: subprocess.CompletedProcess) -> list[str]:
    """The ``error:`` lines (tqdm redraws its bar with carriage returns)."""
    lines = [part.strip() for ln in p.stderr.splitlines() for part in ln.split("\r")]
    return [ln for ln in lines if ln.startswith("error:")]


def state(out: Path) -> dict:
    ck = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    return {"epoch": ck["epoch"], "weights": ck["state_dict"], "assign": ck["assign"],
            "momentum": [s["momentum_buffer"] for s in ck["optimizer"]["state"].values()],
            "log": [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")}
                    for r in log],
            "assignments": (out / "assignments.bin").read_bytes()}


def assert_same(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"] == 3
    assert set(a["weights"]) == set(b["weights"])
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    assert all(torch.equal(x, y) for x, y in zip(a["momentum"], b["momentum"]))
    assert torch.equal(a["assign"], b["assign"]) and a["assignments"] == b["assignments"]
    assert a["log"] == b["log"]


def litter(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.endswith(".tmp") or p.name == ".lock")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref") / "run"
    p = pretrain(out)
    assert p.returncode == 0, p.stderr[-3000:]
    return state(out)


@pytest.mark.parametrize("phase", ["features", "clustering", "training", "saving"])
@pytest.mark.parametrize("sig", ["KILL", "TERM", "INT"])
def test_signal_at_each_phase_then_resume_is_exact(reference, tmp_path, phase, sig):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(DRIVER), phase, "1", sig, "--", *FLAGS, "--out",
                        str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    expected_rc = {"KILL": -signal.SIGKILL, "TERM": -signal.SIGTERM, "INT": 130}[sig]
    assert p.returncode == expected_rc, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    if sig == "INT":
        assert "interrupted; continue with --resume" in p.stderr
        assert not litter(out)  # the temp file and the lock went with a clean stop
    # the epoch-0 checkpoint is intact whatever was interrupted in epoch 1, except that a
    # TERM in the middle of epoch 1's save is held until that save is in place
    # (dcbench.core.deferred_signals): the checkpoint then has 2 epochs done
    done = 2 if (sig, phase) == ("TERM", "saving") else 1
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == done
    resumed = pretrain(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if sig != "INT":  # a kill leaves its lock (and, while saving, a temp file): taken over
        assert "stale lock" in resumed.stderr
    assert not litter(out)
    assert_same(state(out), reference)


def test_two_pretrainings_on_one_folder(reference, tmp_path):
    out, release = tmp_path / "run", tmp_path / "release"
    # the first run pauses in its first epoch's training until ``release`` exists
    first = subprocess.Popen([sys.executable, str(DRIVER), "hold", "0", "KILL", "--", *FLAGS,
                              "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "DC_RELEASE": str(release)})
    deadline = time.time() + 120
    while not (out / ".lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = pretrain(out, "--resume")
    release.touch()
    assert second.returncode == 2, second.stderr[-2000:]
    msg, = error_lines(second)
    assert f"run folder {out} is in use by pid {first.pid}" in msg and ".lock" in msg
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    assert not litter(out)
    assert_same(state(out), reference)  # the second process changed nothing


def test_broken_weights_never_replace_the_last_good_checkpoint(tmp_path):
    """A last step that leaves NaN in the weights (the loss before it was finite): the
    epoch-1 checkpoint stays as it was, the message names it and the flag, --resume works."""
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(DRIVER), "poison", "1", "KILL", "--", *FLAGS,
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-2000:]
    msg, = error_lines(p)
    assert "epoch 1" in msg and "NaN/inf" in msg and "classifier.1.weight" in msg, msg
    assert f"the checkpoint of epoch 1 in {out} is intact" in msg and "--resume" in msg, msg
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert not litter(out)
    again = pretrain(out, "--resume")
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.parametrize("flags,needle", [
    (["--momentum", "nan"], "--momentum"), (["--momentum", "1.5"], "--momentum"),
    (["--lr", "inf"], "--lr"), (["--lr", "1e30"], "--lr"), (["--lr", "-0.1"], "--lr"),
    (["--weight-decay", "nan"], "--weight-decay"), (["--head-lr", "0"], "--head-lr")])
def test_bad_hyperparameters_fail_before_any_work(tmp_path, flags, needle):
    out = tmp_path / "run"
    p = pretrain(out, *flags)
    assert p.returncode == 2
    msg, = error_lines(p)
    assert needle in msg and "finite number" in msg
    assert not out.exists()  # nothing was started


def _mount_tmpfs(path: Path, size: str, ro: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "45m"):
        pytest.skip("this machine does not allow mounting a tmpfs")
    yield disk
    subprocess.run(["umount", "-l", str(disk)])


def test_full_disk_keeps_the_previous_checkpoint(small_disk, tmp_path):
    """A checkpoint of this net (weights + momentum) is ~30 MB: the first fits in 45 MB, the
    second cannot be written next to it. One line naming the file; epoch 0's checkpoint intact; after moving
    the run to a roomy disk, --resume finishes it."""
    out = small_disk / "run"
    p = pretrain(out, "--epochs", "2")
    assert p.returncode == 2, p.stderr[-2000:]
    msg, = error_lines(p)
    assert "no space left on device" in msg and str(out / "checkpoint.pth") in msg, msg
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert not [q for q in out.iterdir() if q.name.endswith(".tmp")]
    moved = tmp_path / "moved"
    subprocess.run(["cp", "-a", str(out), str(moved)], check=True)
    again = pretrain(moved, "--epochs", "2", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]


def test_unwritable_out_folder_is_one_line(tmp_path):
    if os.geteuid() == 0:
        ro = tmp_path / "ro"
        if not _mount_tmpfs(ro, "1m", ro=True):
            pytest.skip("this machine does not allow mounting a tmpfs")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    try:
        p = pretrain(ro / "run")
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        msg, = error_lines(p)
        assert str(ro / "run") in msg and ("read-only" in msg or "permission denied" in msg)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(ro)])


def test_outputs_honour_the_umask(tmp_path):
    code = ("import os, sys; os.umask(int(sys.argv[1], 8)); "
            "from pretrain.__main__ import main; sys.exit(main(sys.argv[2:]))")
    for umask, mode in (("022", 0o644), ("077", 0o600), ("002", 0o664)):
        out = tmp_path / f"run{umask}"
        p = subprocess.run([sys.executable, "-c", code, umask, *FLAGS, "--epochs", "1", "--out",
                            str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        for name in ("checkpoint.pth", "config.json", "log.jsonl", "assignments.bin"):
            assert (out / name).stat().st_mode & 0o777 == mode, (umask, name)
