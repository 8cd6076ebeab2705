"""VOC07 classification (fc6-8 / all) on the embedded VOC-format suite: the recipe runs
through run_all into the VOC table; a killed cell resumes to the same numbers; the frozen
parts are checked; bad VOC inputs are one clear message with no record."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import load_fixture_module
from evaluations import finetune, voc_classification as vc
from evaluations.backbone import describe_checkpoint
from evaluations.context import Runtime, TaskContext
from evaluations.datasets.embedded import build_embedded

REPO = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")
lc = load_fixture_module("legacy_checkpoints.py", "legacy_checkpoints_fixture")
TINY = vc.VocClassificationConfig(iterations=40, batch_size=8, input_size=64, lr=0.01,
                                  lr_step=20, test_crops=2)


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("voc")
    root = build_embedded(tmp / "cache", roles=("voc07",), voc_trainval=48, voc_test=24,
                          voc_size=96)["voc07"]
    ckpt = tmp / "released.pth"
    lc.write_released_checkpoint(ckpt, "alexnet", fc_dim=64, k=None, seed=0)
    return {"root": root, "ckpt": ckpt, "tmp": tmp}


def ctx(voc, state: Path, save_every: int = 1000) -> TaskContext:
    return TaskContext(describe_checkpoint(voc["ckpt"]), "voc07", voc["root"], 0,
                       Runtime(workers=0, save_every=save_every), torch.device("cpu"), state)


@pytest.mark.parametrize("mode", ["fc6-8", "all"])
def test_one_number_per_mode_with_per_class_aps(voc, tmp_path, mode):
    m, = vc.run(replace(TINY, mode=mode), ctx(voc, tmp_path / "s"))
    assert m.column == f"classification/{mode}" and m.metric == "mAP"
    assert 0 <= m.value <= 100 and m.details["iterations"] == 40
    aps = [v for v in m.details["per_class_ap"].values() if v is not None]
    assert len(m.details["per_class_ap"]) == 20 and len(aps) >= 15
    assert m.value == pytest.approx(sum(aps) / len(aps), abs=1e-3)  # mean of the defined APs
    assert m.details["data"] == {"train": 48, "test": 24, "train_split": "trainval",
                                 "test_split": "test"}
    assert not (tmp_path / "s").exists()  # the training state is gone once the cell is done


def test_frozen_parts_stay_and_a_changed_one_fails_loudly(voc, tmp_path, monkeypatch):
    net = vc.VocNet(vc.load_cell_checkpoint(ctx(voc, tmp_path)), TINY, 0)
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trained == {"trunk.classifier.1.weight", "trunk.classifier.1.bias",
                       "trunk.classifier.4.weight", "trunk.classifier.4.bias", "fc8.weight",
                       "fc8.bias"}  # fc6-8: conv layers and BN affine frozen
    variant = vc.VocNet(vc.load_cell_checkpoint(ctx(voc, tmp_path)),
                        replace(TINY, bn_affine_trainable=True), 0)
    assert "trunk.features.1.weight" in {n for n, p in variant.named_parameters()
                                         if p.requires_grad}
    every = vc.VocNet(vc.load_cell_checkpoint(ctx(voc, tmp_path)), replace(TINY, mode="all"), 0)
    frozen = {n for n, p in every.named_parameters() if not p.requires_grad}
    assert frozen == {"trunk.sobel.0.weight", "trunk.sobel.0.bias", "trunk.sobel.1.weight",
                      "trunk.sobel.1.bias"}  # all: everything but Sobel

    step = torch.optim.SGD.step

    def step_and_touch_conv1(self, *a, **kw):  # a bug that updates a frozen tensor
        out = step(self, *a, **kw)
        with torch.no_grad():
            net_under_test[0].trunk.features[0].weight.add_(1e-6)
        return out

    net_under_test = []
    init = vc.VocNet.__init__

    def remember(self, *a, **kw):
        init(self, *a, **kw)
        net_under_test.append(self)

    monkeypatch.setattr(vc.VocNet, "__init__", remember)
    monkeypatch.setattr(torch.optim.SGD, "step", step_and_touch_conv1)
    with pytest.raises(RuntimeError, match="a frozen parameter or a BatchNorm buffer changed"):
        vc.run(TINY, ctx(voc, tmp_path / "s"))


def test_a_killed_cell_resumes_to_the_same_numbers(voc, tmp_path):
    """A real SIGKILL after the state of iteration 20 was saved; the rerun resumes there."""
    full, = vc.run(TINY, ctx(voc, tmp_path / "full"))
    state = tmp_path / "killed"
    code = ("import sys, torch; sys.path.insert(0, 'tests');"
            "from test_voc_classification import *; import test_voc_classification as t;"
            "v = {'root': Path(sys.argv[1]), 'ckpt': Path(sys.argv[2])};"
            "vc.run(replace(t.TINY, iterations=40), t.ctx(v, Path(sys.argv[3]), save_every=10))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(voc["root"]), str(voc["ckpt"]),
                             str(state)], cwd=REPO, stderr=subprocess.DEVNULL)
    saved = state / finetune.STATE_FILE
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if saved.exists() and torch.load(saved, weights_only=True)["iteration"] >= 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at = torch.load(saved, weights_only=True)["iteration"]
    assert 20 <= at < 40, "the kill should land mid-training"
    resumed, = vc.run(TINY, ctx(voc, state, save_every=10))
    assert resumed.details["resumed_from"] == at
    assert resumed.value == full.value
    assert resumed.details["per_class_ap"] == full.details["per_class_ap"]


SUITE = """
name = "voc"
[datasets]
voc07 = "{root}"
[resources]
cpus_per_task = 2
mem_gb = 2
timeout_min = 10
[runtime]
workers = 0
[[cell]]
task = "voc_classification"
datasets = ["voc07"]
[cell.config]
iterations = 10
batch_size = 8
input_size = 64
test_crops = 1
mode = "{mode}"
"""


def run_all(voc, root, results, mode="fc6-8"):
    suite = voc["tmp"] / f"suite-{mode}.toml"
    suite.write_text(SUITE.format(root=root, mode=mode))
    return subprocess.run([sys.executable, "-m", "evaluations.run_all", "--ckpt", str(voc["ckpt"]),
                           "--suite", str(suite), "--results", str(results), "--executor",
                           "debug"], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_run_all_fills_the_voc_table(voc, tmp_path):
    res = tmp_path / "res"
    for mode in ("fc6-8", "all"):
        p = run_all(voc, voc["root"], res, mode)
        assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "t"
    subprocess.run([sys.executable, "tables/render.py", "--results", str(res), "--out", str(out),
                    "--format", "csv", "--no-figures", "-q"], cwd=REPO, check=True)
    import pandas as pd

    df = pd.read_csv(out / "voc.csv", keep_default_na=False)
    ours = df[(df["section"] == "ours")]
    filled = ours[ours["column"].str.startswith("classification/")]
    assert sorted(filled["column"]) == ["classification/all", "classification/fc6-8"]
    assert all(float(v) >= 0 for v in filled["value"])
    assert set(ours[ours["column"].str.startswith("detection/")]["text"]) == {"missing"}


def _copy(voc, tmp_path) -> Path:
    dst = tmp_path / "voc"
    shutil.copytree(voc["root"], dst)
    return dst / "VOCdevkit" / "VOC2007"


@pytest.mark.parametrize("case", ["missing_root", "missing_year", "bad_box", "nonnumeric_box",
                                  "missing_image", "disagreeing_labels"])
def test_bad_voc_inputs_one_clear_error_no_record(voc, tmp_path, case):
    res = tmp_path / "res"
    root = tmp_path / "voc"
    if case == "missing_root":
        expect = str(tmp_path / "nope")
        root = tmp_path / "nope"
    else:
        year = _copy(voc, tmp_path)
        xml = sorted((year / "Annotations").glob("*.xml"))[0]
        if case == "missing_year":
            shutil.rmtree(year)
            expect = "VOC2007"
        elif case in ("bad_box", "nonnumeric_box"):
            text = xml.read_text()
            start = text.index("<xmax>") + len("<xmax>")
            end = text.index("</xmax>")
            text = text[:start] + ("0" if case == "bad_box" else "12px") + text[end:]
            xml.write_text(text)
            expect = xml.name
        elif case == "missing_image":
            first = (year / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
            (year / "JPEGImages" / f"{first}.jpg").unlink()
            expect = f"{first}.jpg"
        else:
            ids = (year / "ImageSets" / "Main" / "trainval.txt").read_text().split()
            path = year / "ImageSets" / "Main" / "aeroplane_trainval.txt"
            lines = path.read_text().splitlines()
            i, label = lines[0].split()
            lines[0] = f"{i} {'-1' if label == '1' else ' 1'}"
            path.write_text("\n".join(lines) + "\n")
            expect = f"image {ids[0]}, class aeroplane"
    p = run_all(voc, root, res)
    assert p.returncode == 2, (p.stdout[-1000:], p.stderr[-2000:])
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], errors
    assert "Traceback" not in p.stderr
    assert not list(res.glob("*/*.json"))
