"""Linear-probe engine: metrics against hand-computed values, the paper's pooling dims,
multi-head == single-head, and the frozen-backbone check."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Dataset

from evaluations.heads import HeadTrainConfig, bottou_lr, train_heads
from evaluations.linear import conv_heads
from evaluations.metrics import tencrop_probs, topk_correct
from pretrain.models import AlexNet


def test_accuracy_hand_computed():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    target = torch.tensor([1, 1, 2, 2])
    # row 0 right, row 1 wrong (0 wins), row 2 right, row 3 wrong -> 2/4
    assert topk_correct(scores, target, 1) == 2
    # top-2: row 1 has {0,1} -> right; row 3 has {0,2} -> right -> 4/4
    assert topk_correct(scores, target, 2) == 4


def test_tencrop_softmax_average_hand_computed():
    # one image, two crops: averaging softmaxes differs from averaging logits here
    logits = torch.tensor([[4.0, 0.0], [-1.0, 0.0]])
    p = tencrop_probs(logits, 2)
    e4 = math.exp(4)
    expected0 = (e4 / (e4 + 1) + math.exp(-1) / (math.exp(-1) + 1)) / 2
    assert p.shape == (1, 2)
    assert p[0, 0].item() == pytest.approx(expected0, rel=1e-6)
    assert p[0, 1].item() == pytest.approx(1 - expected0, rel=1e-6)


def test_bottou_decay_formula():
    assert bottou_lr(0.01, 1e-7, 0) == 0.01
    assert bottou_lr(0.01, 1e-7, 10**9) == pytest.approx(0.01 / math.sqrt(1 + 0.01 * 1e-7 * 1e9))


def test_paper_pooling_dims_at_224():
    """PROTOCOLS §2: 9600 / 9216 / 9600 / 9600 / 9216 features at 224 input."""
    net = AlexNet(sobel=True).eval()
    _, info = conv_heads(net, ["conv1", "conv2", "conv3", "conv4", "conv5"], 224, 1000, 0,
                         torch.device("cpu"))
    assert [info[f"conv{i}"]["dims"] for i in range(1, 6)] == [9600, 9216, 9600, 9600, 9216]
    assert info["conv1"]["pool"] == "avg6s6p3" and info["conv5"]["pool"] == "avg2s2p0"


def test_pooling_at_small_input_caps_grid_at_map():
    net = AlexNet(sobel=True, fc_dim=64).eval()
    _, info = conv_heads(net, ["conv1", "conv3"], 64, 10, 0, torch.device("cpu"))
    assert info["conv1"]["map"] == [96, 15, 15] and info["conv1"]["dims"] == 96 * 10 * 10
    assert info["conv3"]["map"] == [384, 3, 3] and info["conv3"]["dims"] == 384 * 3 * 3


class _Fixed(Dataset):
    """Fixed tensors (no random transforms): the data order alone decides the batches."""

    def __init__(self, n, crops=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        shape = (n, crops, 3, 32, 32) if crops else (n, 3, 32, 32)
        self.x = torch.randn(shape, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]), i


def _train(layers, backbone):
    cfg = HeadTrainConfig(epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-4,
                          workers=0, seed=3)
    heads, _ = conv_heads(backbone, layers, 32, 4, cfg.seed, torch.device("cpu"))
    return train_heads(backbone, heads, _Fixed(24), _Fixed(6, crops=10, seed=1), cfg,
                       torch.device("cpu"))


def test_multi_head_equals_single_layer_runs():
    torch.manual_seed(0)
    net = AlexNet(sobel=True, fc_dim=64).eval()
    together = _train(["conv1", "conv2", "conv3", "conv4", "conv5"], net)
    for layer in ["conv1", "conv3", "conv5"]:
        alone = _train([layer], net)
        assert alone[layer].epochs == together[layer].epochs


def test_backbone_change_is_caught():
    """A backbone left in train mode updates BN running stats: the check must fire."""
    torch.manual_seed(0)
    net = AlexNet(sobel=True, fc_dim=64)
    net.eval = lambda: net  # a buggy evaluation that forgets eval mode
    net.train()
    with pytest.raises(RuntimeError, match="frozen backbone changed"):
        _train(["conv1"], net)


def test_cached_val_taps_give_identical_numbers():
    torch.manual_seed(0)
    net = AlexNet(sobel=True, fc_dim=64).eval()
    cfg = dict(epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-4, workers=0,
               seed=3)
    runs = []
    for gb in (0.0, 1.0):  # never cache / cache
        heads, _ = conv_heads(net, ["conv2", "conv5"], 32, 4, 3, torch.device("cpu"))
        runs.append(train_heads(net, heads, _Fixed(24), _Fixed(6, crops=10, seed=1),
                                HeadTrainConfig(**cfg, val_cache_gb=gb), torch.device("cpu")))
    assert runs[0]["conv2"].epochs == runs[1]["conv2"].epochs
    assert runs[0]["conv5"].epochs == runs[1]["conv5"].epochs


def test_selection_over_lr_grid_hand_built():
    from evaluations.heads import EpochScores, HeadHistory
    from evaluations.linear import measurements

    def hist(name, top1s):
        return HeadHistory(name, [EpochScores(e, 1.0, v, v - 1, v + 5) for e, v in enumerate(top1s)])

    # lr 0.01 peaks at epoch 1 (60) then drops; lr 0.001 ends best (55 > 50) but peaks lower
    ms = measurements({"conv3@lr0.01": hist("conv3@lr0.01", [40, 60, 50]),
                       "conv3@lr0.001": hist("conv3@lr0.001", [30, 45, 55])}, "imagenet/conv3", {})
    got = {(m.selection, m.variant): (m.value, m.details["head"], m.details["epoch"]) for m in ms}
    assert got[("best_epoch", "10crop")] == (60, "conv3@lr0.01", 1)
    assert got[("best_epoch", "center")] == (59, "conv3@lr0.01", 1)
    assert got[("last_epoch", "10crop")] == (55, "conv3@lr0.001", 2)


def test_bad_probe_config_in_a_suite_is_one_clear_error():
    from evaluations.suites import parse_suite
    from dcbench.core import UserError

    for config, needle in (({"lrs": []}, "lrs"), ({"layers": ["conv6"]}, "conv6"),
                           ({"lrs": [-0.1]}, "lrs"), ({"epochs": 0}, "epochs"),
                           ({"lrs": [float("inf")]}, "lrs"),
                           ({"momentum": float("nan")}, "momentum"),
                           ({"weight_decay": -1.0}, "weight_decay")):
        with pytest.raises(UserError, match=needle):
            parse_suite({"cell": [{"task": "linear", "datasets": ["imagenet"],
                                   "config": config}]}, "t.toml")


def test_heads_sharing_an_input_score_as_each_alone():
    """Several lrs on one layer are scored by one stacked matmul: every head's 10-crop top-1 /
    top-5 and centre top-1 must be what its own module gives, computed here by hand."""
    from evaluations.heads import evaluate_heads, val_features
    torch.manual_seed(0)
    net = AlexNet(sobel=True, fc_dim=64).eval()
    heads, _ = conv_heads(net, ["conv2", "conv5"], 32, 4, 0, torch.device("cpu"),
                          lrs=(0.1, 0.01, 0.001))
    with torch.no_grad():  # distinct weights per head (their inits share no seed anyway)
        for i, h in enumerate(heads):
            h.module[1].weight.mul_(1 + i)
    val = _Fixed(60, crops=10, seed=1)
    batches = list(val_features(net, heads, torch.utils.data.DataLoader(val, batch_size=5),
                                torch.device("cpu")))
    scores = evaluate_heads(heads, batches)
    with torch.no_grad():
        taps = net.forward_taps(val.x.flatten(0, 1), ["conv2", "conv5"])
        for h in heads:
            logits = h.module(h.pre(taps[h.tap])).view(60, 10, -1)
            mean = logits.softmax(-1).mean(1)
            top1 = 100 * (mean.argmax(1) == val.y).float().mean().item()
            centre = 100 * (logits[:, 4].argmax(1) == val.y).float().mean().item()
            assert scores[h.name][0] == pytest.approx(top1)
            assert scores[h.name][1] == pytest.approx(centre)
            assert scores[h.name][2] == pytest.approx(100.0)  # 4 classes: top-5 is all
    assert len({scores[h.name][:2] for h in heads}) > 2  # the heads do differ


def _authors_train_crops(resize: int, size: int, flip: float = 0.5):
    """The probe's training transform written out in the authors' order (PIL crop and flip,
    then ToTensor and the ImageNet normalisation): the reference for the split transform."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize), T.CenterCrop(resize), T.RandomCrop(size),
                      T.RandomHorizontalFlip(flip), T.ToTensor(),
                      T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])


def test_split_train_transform_gives_the_authors_pixels_and_draws():
    """Prefix (resize, normalise) then suffix (crop, flip on the tensor) = the authors' PIL
    order, pixel for pixel, for every seed, on real images -- seeds that flip and seeds that
    do not (told apart by the same reference with its flip switched off)."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    from dcbench.core import probe_train_transform

    photo = Image.fromarray(skdata.astronaut()).resize((97, 83))
    ramp = np.arange(28 * 28) % 251
    grey = Image.fromarray(ramp.astype(np.uint8).reshape(28, 28)).convert("RGB")
    flipped = []
    for img, (resize, size) in ((photo, (72, 64)), (grey, (72, 64)), (photo, (40, 32))):
        ours, ref = probe_train_transform(resize, size), _authors_train_crops(resize, size)
        unflipped_ref = _authors_train_crops(resize, size, flip=0.0)
        for seed in range(12):
            torch.manual_seed(seed)
            a = ours(img)
            after_ours = torch.rand(1)
            torch.manual_seed(seed)
            b = ref(img)
            assert torch.equal(a, b), (resize, size, seed)
            assert torch.equal(after_ours, torch.rand(1))  # the same number of draws
            torch.manual_seed(seed)
            flipped.append(not torch.equal(a, unflipped_ref(img)))
    assert any(flipped) and not all(flipped)


def test_train_images_are_decoded_once_and_crop_as_before():
    """With the memo the reader decodes each image once, and every epoch's random crops equal
    those of decoding again (seeded per epoch and draw)."""
    from dcbench.core import SeededDraws, probe_train_prefix, probe_train_suffix
    from evaluations.heads import MemoPrefix

    class Reader(Dataset):
        def __init__(self, transform):
            from PIL import Image
            from skimage import data as skdata
            self.img = Image.fromarray(skdata.chelsea()).resize((80, 60))
            self.transform, self.calls = transform, []

        def __len__(self):
            return 5

        def __getitem__(self, i):
            self.calls.append(i)
            return self.transform(self.img.rotate(10 * i)), i % 2, i

    memo_reader, fresh_reader = Reader(probe_train_prefix(72)), Reader(probe_train_prefix(72))
    memo = SeededDraws(MemoPrefix(memo_reader, probe_train_suffix(64), True), 7)
    fresh = SeededDraws(MemoPrefix(fresh_reader, probe_train_suffix(64), False), 7)
    for epoch in range(3):
        memo.set_epoch(epoch)
        fresh.set_epoch(epoch)
        for draw, i in enumerate([3, 0, 4, 1, 2]):
            a, b = memo[(draw, i)], fresh[(draw, i)]
            assert torch.equal(a[0], b[0]) and a[1:] == b[1:] == (i % 2, i)
    assert memo_reader.calls == [3, 0, 4, 1, 2]  # memo: the first epoch only
    assert len(fresh_reader.calls) == 15         # fresh: every epoch
