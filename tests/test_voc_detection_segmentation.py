"""VOC07 detection and VOC12 segmentation (fc6-8 / all) on the embedded VOC-format suite:
the networks are built from the checkpoint's own tensors (checked against its Linear layers
and taps), one number per mode, a killed cell resumes to the same numbers, frozen parts are
checked, and bad inputs are one clear message with no record, through run_all."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import load_fixture_module
from evaluations import finetune, voc_detection as vd, voc_segmentation as vs
from evaluations.backbone import describe_checkpoint, load_cell_checkpoint
from evaluations.context import Runtime, TaskContext
from evaluations.datasets.embedded import build_embedded
from pretrain.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")
lc = load_fixture_module("legacy_checkpoints.py", "legacy_checkpoints_fixture")
DET = vd.VocDetectionConfig(iterations=8, batch_size=2, lr=0.01, lr_step=1000, min_size=96,
                            max_size=96, anchor_sizes=(16, 32, 64), rpn_pre_nms_train=200,
                            rpn_post_nms_train=50, rpn_pre_nms_test=200, rpn_post_nms_test=30,
                            roi_batch=16)
SEG = vs.VocSegmentationConfig(iterations=8, batch_size=4, lr=0.01, crop_size=96,
                               scale_range=(0.75, 1.25))
TASKS = {"det": (vd, DET, "voc07"), "seg": (vs, SEG, "voc12")}


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("vocds")
    roots = build_embedded(tmp / "cache", roles=("voc07", "voc12"), voc_trainval=32,
                           voc_test=16, voc_size=96)
    ckpt = tmp / "released.pth"
    lc.write_released_checkpoint(ckpt, "alexnet", fc_dim=64, k=None, seed=0)
    return {"voc07": roots["voc07"], "voc12": roots["voc12"], "ckpt": ckpt, "tmp": tmp}


def ctx(voc, role: str, state: Path, save_every: int = 1000) -> TaskContext:
    return TaskContext(describe_checkpoint(voc["ckpt"]), role, voc[role], 0,
                       Runtime(workers=0, save_every=save_every), torch.device("cpu"), state)


# --------------------------------------------------------------------------- the networks


def test_detector_is_the_checkpoints_trunk_and_fc_layers(voc, tmp_path):
    ref = load_checkpoint(voc["ckpt"]).model.eval()
    det = vd.Detector(load_cell_checkpoint(ctx(voc, "voc07", tmp_path)), DET, 0).eval()
    x = torch.randn(2, 3, 96, 96)
    # conv5 at stride 16, the last max-pool dropped: the reference network's conv5 tap
    torch.testing.assert_close(det.model.backbone(x), ref.forward_taps(x, ["conv5"])["conv5"])
    assert det.model.backbone.out_channels == 256 and det.grid == 6
    pooled = torch.randn(5, 256, 6, 6)
    fc6, fc7 = ref.classifier[1], ref.classifier[4]
    want = torch.relu(fc7(torch.relu(fc6(pooled.flatten(1)))))
    torch.testing.assert_close(det.model.roi_heads.box_head(pooled), want)  # eval: no dropout
    assert det.model.roi_heads.box_predictor.cls_score.out_features == 21  # 20 + background
    assert det.model.roi_heads.box_roi_pool.output_size == (6, 6)


def test_fcn_fc6_is_the_checkpoints_fc6_as_a_convolution(voc, tmp_path):
    ref = load_checkpoint(voc["ckpt"]).model.eval()
    fcn = vs.FCN32s(load_cell_checkpoint(ctx(voc, "voc12", tmp_path)), SEG, 0).eval()
    pool5 = torch.randn(3, 256, 6, 6)
    a, b = fcn.pad
    conv = fcn.fc6(F.pad(pool5, (a, b, a, b)))
    assert conv.shape[-2:] == (6, 6)  # the map keeps its size
    # the output whose window is the whole 6x6 map equals fc6 on the flattened map
    torch.testing.assert_close(conv[:, :, a, a], ref.classifier[1](pool5.flatten(1)))
    h = torch.randn(3, 64, 4, 5)
    torch.testing.assert_close(fcn.fc7(h), torch.einsum("oi,bihw->bohw", ref.classifier[4].weight,
                                                        h) + ref.classifier[4].bias[:, None, None])
    x = torch.randn(2, 3, 100, 84)
    assert fcn(x).shape == (2, 21, 100, 84)
    assert torch.count_nonzero(fcn(x)) == 0  # the score layer starts at zero, as FCN


@pytest.mark.parametrize("task", ["det", "seg"])
def test_trained_and_frozen_parameters_per_mode(voc, tmp_path, task):
    mod, cfg, role = TASKS[task]
    build = vd.Detector if task == "det" else vs.FCN32s
    fc6_8 = build(load_cell_checkpoint(ctx(voc, role, tmp_path)), cfg, 0)
    every = build(load_cell_checkpoint(ctx(voc, role, tmp_path)), replace(cfg, mode="all"), 0)
    conv = [n for n, _ in fc6_8.named_parameters() if ".features." in f".{n}"]
    assert len(conv) == 20  # 5 conv (weight, bias) + 5 BN (weight, bias)
    assert not any(p.requires_grad for n, p in fc6_8.named_parameters() if n in conv)
    trained = {n for n, p in fc6_8.named_parameters() if p.requires_grad}
    if task == "det":
        assert {n.split(".")[1] for n in trained} == {"rpn", "roi_heads"}
        assert "model.roi_heads.box_head.classifier.1.weight" in trained  # fc6
    else:
        assert trained == {f"{m}.{t}" for m in ("fc6", "fc7", "score") for t in ("weight", "bias")}
    frozen = {n for n, p in every.named_parameters() if not p.requires_grad}
    assert frozen and all(".sobel." in f".{n}" for n in frozen)  # all: everything but Sobel


def test_detection_boxes_follow_a_flip():
    """Inclusive file pixels -> torchvision's continuous boxes, mirrored with the image."""
    from PIL import Image

    img = np.zeros((10, 20, 3), dtype=np.uint8)
    img[2:5, 3:9] = 255  # an object on columns 3..8, rows 2..4 (0-based inclusive)
    target = {"boxes": torch.tensor([[3.0, 2.0, 8.0, 4.0]]), "labels": torch.tensor([4]),
              "difficult": torch.tensor([False])}
    torch.manual_seed(0)
    flips = []
    for _ in range(12):
        x, t = vd.DetectionTransform(hflip=True)(Image.fromarray(img), target)
        x1, y1, x2, y2 = t["boxes"][0].tolist()
        inside = x[0, int(y1):int(y2), int(x1):int(x2)]
        assert inside.numel() == 3 * 6 and bool((inside == 1).all())  # exactly the object
        assert t["labels"].tolist() == [5]  # 0 is torchvision's background
        flips.append(x1 != 3.0)
    assert any(flips) and not all(flips)  # flipped about half of the time


@pytest.mark.parametrize("cls", [vd.VocDetectionConfig, vs.VocSegmentationConfig])
@pytest.mark.parametrize("bad,field", [({"mode": "fc7"}, "mode"), ({"iterations": 0}, "iterations"),
                                       ({"lr": float("nan")}, "lr"), ({"momentum": 1.0}, "momentum"),
                                       ({"train_split": "tarin"}, "splits")])
def test_bad_recipe_values_are_refused_by_name(cls, bad, field):
    from dcbench.core import UserError

    with pytest.raises(UserError, match=field):
        cls(**bad)


# --------------------------------------------------------------------------- the tasks


@pytest.mark.parametrize("task,mode", [("det", "fc6-8"), ("det", "all"), ("seg", "fc6-8"),
                                       ("seg", "all")])
def test_one_number_per_mode(voc, tmp_path, task, mode):
    mod, cfg, role = TASKS[task]
    m, = mod.run(replace(cfg, mode=mode), ctx(voc, role, tmp_path / "s"))
    what = "detection" if task == "det" else "segmentation"
    assert m.column == f"{what}/{mode}" and m.metric == ("mAP" if task == "det" else "mIoU")
    assert 0 <= m.value <= 100 and m.details["iterations"] == 8
    per = m.details["per_class_ap" if task == "det" else "per_class_iou"]
    assert len(per) == (20 if task == "det" else 21)
    defined = [v for v in per.values() if v is not None]
    assert m.value == pytest.approx(sum(defined) / len(defined), abs=1e-3)
    assert not (tmp_path / "s").exists()  # the training state is gone once the cell is done


@pytest.mark.parametrize("task", ["det", "seg"])
def test_a_changed_frozen_tensor_fails_the_cell(voc, tmp_path, monkeypatch, task):
    mod, cfg, role = TASKS[task]
    step = torch.optim.SGD.step

    def step_and_touch_conv1(self, *a, **kw):  # a bug that updates a frozen tensor
        out = step(self, *a, **kw)
        with torch.no_grad():
            touched[0].add_(1e-6)
        return out

    touched = []
    build = mod.Detector if task == "det" else mod.FCN32s
    init = build.__init__

    def remember(self, *a, **kw):
        init(self, *a, **kw)
        touched.append(next(p for n, p in self.named_parameters() if "features.0.weight" in n))

    monkeypatch.setattr(build, "__init__", remember)
    monkeypatch.setattr(torch.optim.SGD, "step", step_and_touch_conv1)
    with pytest.raises(RuntimeError, match="a frozen parameter or a BatchNorm buffer changed"):
        mod.run(cfg, ctx(voc, role, tmp_path / "s"))


@pytest.mark.parametrize("task", ["det", "seg"])
def test_a_killed_cell_resumes_to_the_same_numbers(voc, tmp_path, task):
    """A real SIGKILL after the state of iteration 4 was saved; the rerun resumes there."""
    mod, cfg, role = TASKS[task]
    cfg = replace(cfg, iterations=12)
    full, = mod.run(cfg, ctx(voc, role, tmp_path / "full"))
    state = tmp_path / "killed"
    code = ("import sys, torch; sys.path.insert(0, 'tests');"
            "import test_voc_detection_segmentation as t; from dataclasses import replace;"
            "from pathlib import Path;"
            "v = {'voc07': Path(sys.argv[1]), 'voc12': Path(sys.argv[2]), 'ckpt': Path(sys.argv[3])};"
            f"mod, cfg, role = t.TASKS[{task!r}];"
            "mod.run(replace(cfg, iterations=12), t.ctx(v, role, Path(sys.argv[4]), save_every=4))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(voc["voc07"]), str(voc["voc12"]),
                             str(voc["ckpt"]), str(state)], cwd=REPO, stderr=subprocess.DEVNULL)
    saved = state / finetune.STATE_FILE
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if saved.exists():
            try:
                if torch.load(saved, weights_only=True)["iteration"] >= 4:
                    break
            except Exception:  # noqa: BLE001 -- being replaced right now
                pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at = torch.load(saved, weights_only=True)["iteration"]
    assert 4 <= at < 12, "the kill should land mid-training"
    resumed, = mod.run(cfg, ctx(voc, role, state, save_every=4))
    assert resumed.details["resumed_from"] == at
    assert resumed.value == full.value
    key = "per_class_ap" if task == "det" else "per_class_iou"
    assert resumed.details[key] == full.details[key]


# --------------------------------------------------------------------------- through run_all

SUITE = """
name = "vocds"
[datasets]
voc07 = "{voc07}"
voc12 = "{voc12}"
[resources]
cpus_per_task = 2
mem_gb = 2
timeout_min = 10
[runtime]
workers = 0
[[cell]]
task = "voc_detection"
datasets = ["voc07"]
[cell.config]
mode = "{mode}"
iterations = 4
min_size = 96
max_size = 96
anchor_sizes = [16, 32, 64]
rpn_post_nms_test = 20
roi_batch = 16
[[cell]]
task = "voc_segmentation"
datasets = ["voc12"]
[cell.config]
mode = "{mode}"
iterations = 4
batch_size = 2
crop_size = 96
"""


def run_all(voc, results, voc07=None, voc12=None, mode="fc6-8", ckpt=None):
    suite = results.parent / f"suite-{mode}.toml"
    suite.write_text(SUITE.format(voc07=voc07 or voc["voc07"], voc12=voc12 or voc["voc12"],
                                  mode=mode))
    return subprocess.run([sys.executable, "-m", "evaluations.run_all", "--ckpt",
                           str(ckpt or voc["ckpt"]), "--suite", str(suite), "--results",
                           str(results), "--executor", "debug"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_run_all_fills_the_detection_and_segmentation_columns(voc, tmp_path):
    res = tmp_path / "res"
    for mode in ("fc6-8", "all"):
        p = run_all(voc, res, mode=mode)
        assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "t"
    subprocess.run([sys.executable, "tables/render.py", "--results", str(res), "--out", str(out),
                    "--format", "csv", "--no-figures", "-q"], cwd=REPO, check=True)
    import pandas as pd

    df = pd.read_csv(out / "voc.csv", keep_default_na=False)
    ours = df[df["section"] == "ours"]
    assert len(set(ours["method"])) == 1  # one row: each column's own protocol and test variant
    filled = ours[ours["column"].str.match("detection/|segmentation/")]
    assert sorted(filled["column"]) == ["detection/all", "detection/fc6-8",
                                        "segmentation/all", "segmentation/fc6-8"]
    assert all(0 <= float(v) <= 100 for v in filled["value"])


def _copy(voc, tmp_path, role: str) -> Path:
    dst = tmp_path / role
    shutil.copytree(voc[role], dst)
    return dst / "VOCdevkit" / ("VOC2007" if role == "voc07" else "VOC2012")


@pytest.mark.parametrize("case", ["resnet50", "no_objects", "box_outside", "mask_size"])
def test_bad_inputs_one_clear_error_no_record(voc, tmp_path, case):
    res = tmp_path / "res"
    kw = {}
    if case == "resnet50":
        from pretrain.models import ModelSpec, build_model

        path = tmp_path / "r50.pth"
        torch.save({"arch": "resnet50", "state_dict": build_model(
            ModelSpec("resnet50", sobel=False)).state_dict()}, path)
        kw["ckpt"], expect = path, "needs a network with fc6/fc7"
    elif case in ("no_objects", "box_outside"):
        year = _copy(voc, tmp_path, "voc07")
        xml = year / "Annotations" / (
            (year / "ImageSets" / "Main" / "trainval.txt").read_text().split()[0] + ".xml")
        text = xml.read_text()
        if case == "no_objects":  # every <object> removed (the per-class files say -1 then)
            text = text[:text.index("<object>")] + text[text.rindex("</object>") + 9:]
            for cls_file in (year / "ImageSets" / "Main").glob("*_*.txt"):
                lines = [(f"{xml.stem} -1" if ln.split()[0] == xml.stem else ln)
                         for ln in cls_file.read_text().splitlines()]
                cls_file.write_text("\n".join(lines) + "\n")
            expect = f"{xml.name} has no <object>"
        else:  # a box right of the 96-px image
            for tag, v in (("xmin", "200"), ("xmax", "220")):
                start = text.index(f"<{tag}>") + len(tag) + 2
                text = text[:start] + v + text[text.index(f"</{tag}>"):]
            expect = "degenerate box"
        xml.write_text(text)
        kw["voc07"] = year.parent.parent
    else:
        year = _copy(voc, tmp_path, "voc12")
        first = (year / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
        mask = year / "SegmentationClass" / f"{first}.png"
        from PIL import Image

        with Image.open(mask) as m:
            small = m.resize((64, 64), Image.Resampling.NEAREST)
            small.save(mask)
        kw["voc12"], expect = year.parent.parent, f"{first}.png is 64x64"
    p = run_all(voc, res, **kw)
    assert p.returncode == 2, (p.stdout[-1000:], p.stderr[-2000:])
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], errors
    assert "Traceback" not in p.stderr
    assert not list(res.glob("*/*.json"))


def test_segmentation_on_train_aug_reads_sbd_through_its_own_role(voc, tmp_path):
    """sbd = true: the cell needs the sbd role (one clear error without it), trains on
    train_aug = SBD train+val + VOC train - VOC val (SBD masks from official-format .mat
    files written with scipy), and records it; its key differs from the VOC-only cell's."""
    import json

    import scipy.io

    year = Path(voc["voc12"]) / "VOCdevkit" / "VOC2012"
    seg = year / "ImageSets" / "Segmentation"
    train, val = seg.joinpath("train.txt").read_text().split(), seg.joinpath("val.txt").read_text().split()
    ds = tmp_path / "sbd" / "benchmark_RELEASE" / "dataset"
    extra = [f"2009_{k:06d}" for k in range(1, 6)]
    sbd_train, sbd_val = [*extra[:3], train[0], val[0]], [*extra[3:], train[1]]
    for i in dict.fromkeys([*sbd_train, *sbd_val]):
        src = year / "JPEGImages" / f"{(i if i in train + val else train[2])}.jpg"
        (ds / "img").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, ds / "img" / f"{i}.jpg")
        mask = np.zeros((96, 96), dtype=np.uint8)
        mask[20:60, 30:70] = 7
        (ds / "cls").mkdir(exist_ok=True)
        scipy.io.savemat(ds / "cls" / f"{i}.mat", {"GTcls": {
            "Segmentation": mask, "CategoriesPresent": np.array([7], dtype=np.uint8)}})
    (ds / "train.txt").write_text("".join(f"{i}\n" for i in sbd_train))
    (ds / "val.txt").write_text("".join(f"{i}\n" for i in sbd_val))
    res = tmp_path / "res"
    suite = tmp_path / "sbd.toml"
    body = SUITE.split("[[cell]]")[0] + "[[cell]]" + SUITE.split("[[cell]]")[2]
    suite.write_text(body.format(voc07=voc["voc07"], voc12=voc["voc12"], mode="fc6-8")
                     + "sbd = true\n")
    cmd = [sys.executable, "-m", "evaluations.run_all", "--ckpt", str(voc["ckpt"]), "--suite",
           str(suite), "--results", str(res), "--executor", "debug"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "no dataset root for role 'sbd'" in p.stderr, p.stderr[-2000:]
    p = subprocess.run([*cmd, "--data-root", f"sbd={tmp_path / 'sbd'}"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    cell, = res.glob("*/voc_segmentation-*.json")
    rec, = json.loads(cell.read_text())["records"]
    # train_aug: the 5 SBD-only ids + VOC train (train[0], train[1] are in both: counted once);
    # val[0] is VOC val: left out
    assert rec["details"]["data"]["train"] == len(train) + len(extra)
    assert rec["details"]["data"]["train_split"] == "train_aug" and rec["config"]["sbd"] is True


def test_segmentation_confusion_batched_equals_one_by_one_and_sklearn(voc, tmp_path):
    from sklearn.metrics import confusion_matrix as sk_confusion

    from evaluations.datasets.voc import VocSegmentation

    c = ctx(voc, "voc12", tmp_path)
    net = vs.FCN32s(load_cell_checkpoint(c), SEG, 0)
    torch.manual_seed(0)
    torch.nn.init.normal_(net.score.weight, std=0.05)  # non-trivial predictions
    data = VocSegmentation(voc["voc12"], "val", 2012, vs.TestTransform(SEG))
    batched, single = vs.confusion(net, data, c, batch=8), vs.confusion(net, data, c, batch=1)
    np.testing.assert_array_equal(batched, single)
    gts, preds = [], []
    with torch.no_grad():
        for i in range(len(data)):
            x, y, _ = data[i]
            p = net.eval()(x[None]).argmax(1)[0]
            keep = y != 255
            gts.append(y[keep].numpy())
            preds.append(p[keep].numpy())
    want = sk_confusion(np.concatenate(gts), np.concatenate(preds), labels=list(range(21)))
    np.testing.assert_array_equal(batched, want)
    assert len(np.unique(np.concatenate(preds))) > 1


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "3"])
@pytest.mark.parametrize("cls", [vd.VocDetectionConfig, vs.VocSegmentationConfig])
def test_a_bad_test_images_count_is_refused_by_name(cls, bad):
    from dcbench.core import UserError

    with pytest.raises(UserError, match="test_images"):
        cls(test_images=bad)


def test_test_images_scores_the_first_images_the_split_lists(voc, tmp_path):
    """``test_images = 3`` (the demo's smaller test sets) scores exactly the first three ids
    of ImageSets/Segmentation/val.txt: the confusion matrix counts their non-void pixels,
    read here from the PNG masks with PIL; detection reports three test images."""
    from PIL import Image

    from evaluations.datasets.voc import VocSegmentation

    root = VocSegmentation(voc["voc12"], "val", 2012).root
    ids = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    masks = [np.array(Image.open(root / "SegmentationClass" / f"{i}.png")) for i in ids]
    m, = vs.run(replace(SEG, test_images=3), ctx(voc, "voc12", tmp_path / "seg"))
    assert m.details["data"]["test"] == 3
    assert m.details["pixels"] == sum(int((k != 255).sum()) for k in masks[:3])
    assert m.details["pixels"] < sum(int((k != 255).sum()) for k in masks)
    d, = vd.run(replace(DET, test_images=3), ctx(voc, "voc07", tmp_path / "det"))
    assert d.details["data"]["test"] == 3
    big, = vs.run(replace(SEG, test_images=10_000), ctx(voc, "voc12", tmp_path / "all"))
    assert big.details["data"]["test"] == len(ids)  # more than the split holds: all of it
