"""The GPU input pipeline (pretrain/gpu_data.py), run on CPU tensors, against independent
references: torchvision's RandomResizedCrop.get_params and PIL transforms (the CPU path),
PIL's decoders, scipy's two-sample KS test.

Tolerances (normalised units: (x/255 - mean) / std, so one grey level is ~0.017) were
measured on four bundled photos (skimage: astronaut, chelsea, coffee, rocket, saved as JPEG
q90). roi_align resamples with a box of ceil(s) bilinear samples per output pixel where PIL
uses a triangle of half-width s (s = crop side / output side): when upsampling (s <= 1) both
are bilinear and differ by PIL's rounding to uint8 only (mean <= 0.005, max 1 grey level);
the box filter is sharper than PIL's triangle when downscaling, so the mean difference grows
with s (measured maxima: 0.013 at s <= 1.5, 0.030 at s <= 3, 0.053 at s ~ 7).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from dcbench.core import (EnumeratedSampler, SeededDraws, UserError, derive_seed, eval_transform,
                          train_transform)
from pretrain.config import PretrainConfig
from pretrain.data import ArrayImageDataset, ImageListDataset, load_rgb
from pretrain.distributed import Dist, rank_batches
from pretrain.gpu_data import (Crop, GpuInputs, center_crops, crop_params, dali_available,
                               decode, images_of, jpeg_components, read_file, resized_crops)
from pretrain.train import PseudoLabelled, resolve_loader

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
NORM = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
# (largest downscale factor s, mean |diff| bound, max |diff| bound): about 1.3x the measured
# maximum mean; the max bounds (a sanity check: no zero padding, no wrong channel) sit above
# the largest single-pixel differences measured, 2 grey levels when upsampling and 0.6-0.75
# (40 grey levels) at thin high-contrast edges, where box and triangle filters differ most
TOLERANCE = ((1.0, 0.008, 0.04), (1.5, 0.02, 0.85), (3.0, 0.04, 0.95), (math.inf, 0.07, 1.1))


def tolerance(s: float) -> tuple[float, float]:
    return next((m, x) for top, m, x in TOLERANCE if s <= top)


def factor(c: Crop, size: int) -> float:
    return max(c.height, c.width) / size


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    skdata = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    out = {}
    for name in PHOTOS:
        out[name] = folder / f"{name}.jpg"
        Image.fromarray(getattr(skdata, name)()).save(out[name], quality=90)
    return out


def chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def pil_crop(img: Image.Image, c: Crop, size: int) -> torch.Tensor:
    """RandomResizedCrop.forward's crop for a given box, then the flip and normalisation."""
    out = TF.resized_crop(img, c.top, c.left, c.height, c.width, [size, size],
                          InterpolationMode.BILINEAR, antialias=True)
    return NORM(TF.hflip(out) if c.flip else out)


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a - b).abs()
    return d.mean().item(), d.max().item()


# --------------------------------------------------------------------------- crop_params


def test_crop_params_are_torchvisions_draws():
    """The same box and flip as get_params + RandomHorizontalFlip after torch.manual_seed,
    including tiny and extreme images (fallback centre crop with clamped ratio)."""
    shapes = [(375, 500), (500, 333), (28, 28), (8, 400), (400, 8), (1, 1), (3, 2)]
    for seed in range(1500):
        s = derive_seed(5, seed)
        for h, w in shapes:
            with torch.random.fork_rng():
                torch.manual_seed(s)
                box = T.RandomResizedCrop.get_params(Image.new("RGB", (w, h)), [0.08, 1.0],
                                                     [3 / 4, 4 / 3])
                flip = bool(torch.rand(1) < 0.5)
            assert crop_params(s, h, w) == Crop(*box, flip), (seed, h, w)


def test_crop_params_other_scale_and_ratio():
    for seed in range(300):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            box = T.RandomResizedCrop.get_params(Image.new("RGB", (90, 60)), [0.5, 0.9],
                                                 [0.2, 5.0])
            flip = bool(torch.rand(1) < 0.5)
        assert crop_params(seed, 60, 90, (0.5, 0.9), (0.2, 5.0)) == Crop(*box, flip)


def box_stats(boxes, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    b = np.array([(bh, bw) for bh, bw in boxes], dtype=np.float64)
    return b[:, 0] * b[:, 1] / (h * w), np.log(b[:, 1] / b[:, 0])


def test_crop_distribution_ks():
    """5000 boxes from crop_params (seeds 0..4999) against 5000 successive get_params draws
    of one independently seeded generator: area fraction and log aspect ratio, KS p > 0.01."""
    h, w = 375, 500
    ours = [(c.height, c.width) for c in (crop_params(s, h, w) for s in range(5000))]
    with torch.random.fork_rng():
        torch.manual_seed(123456789)
        img = Image.new("RGB", (w, h))
        ref = [T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])[2:]
               for _ in range(5000)]
    for a, b in zip(box_stats(ours, h, w), box_stats(ref, h, w)):
        assert ks_2samp(a, b).pvalue > 0.01
    flips = np.mean([crop_params(s, h, w).flip for s in range(5000)])
    assert abs(flips - 0.5) < 0.03  # 4.2 sigma of a fair coin


# --------------------------------------------------------------------------- decode


def write_formats(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    a = (rng.random((40, 52, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(a)
    files = {"rgb.jpg": (im, {"quality": 90}), "grey.jpg": (im.convert("L"), {}),
             "cmyk.jpg": (im.convert("CMYK"), {}), "rgb.png": (im, {}),
             "rgba.png": (im.convert("RGBA"), {}), "palette.png": (im.convert("P"), {}),
             "g16.png": (Image.fromarray(a[..., 0].astype(np.uint16) * 257), {})}
    out = {}
    for name, (img, kw) in files.items():
        img.save(folder / name, **kw)
        out[name] = folder / name
    png_named_jpeg = folder / "png_named.JPEG"  # ImageNet holds PNGs named .JPEG
    im.save(png_named_jpeg, format="PNG")
    out["png_named.JPEG"] = png_named_jpeg
    return out


def test_decode_equals_pil(tmp_path):
    files = write_formats(tmp_path)
    data = [f.read_bytes() for f in files.values()]
    imgs = decode(data, "cpu", list(files.values()))
    for (name, path), img in zip(files.items(), imgs):
        ref = chw(load_rgb(path))
        assert img.dtype == torch.uint8 and img.shape == ref.shape, name
        # PNG and the PIL fallbacks (CMYK, 16-bit) are exact; JPEGs: both libjpeg-turbo with
        # the same IDCT (measured identical), 2 levels allowed for other builds
        limit = 2 if name in ("rgb.jpg", "grey.jpg") else 0
        assert (img.int() - ref.int()).abs().max().item() <= limit, name
    assert [jpeg_components(d) for d in data[:3]] == [3, 1, 4]
    assert jpeg_components(data[3]) is None
    # bytes without names decode too
    assert torch.equal(decode([data[0]], "cpu")[0], imgs[0])


def test_decode_corrupt_and_missing_files_name_the_path(tmp_path):
    bad = tmp_path / "n01" / "bad.JPEG"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    with pytest.raises(UserError, match="bad.JPEG"):
        decode([bad.read_bytes()], "cpu", [bad])
    with pytest.raises(UserError, match="missing.JPEG"):
        read_file(tmp_path / "missing.JPEG")


# --------------------------------------------------------------------------- crops


def fixed_boxes(h: int, w: int) -> list[Crop]:
    """Deterministic boxes on textured parts of a photo, from 4x upsampling to 1.5x down."""
    return [Crop(h // 4, w // 4, 56, 56), Crop(10, 20, 150, 120, True),
            Crop(h // 5, w // 5, 224, 224), Crop(h - 290, w - 330, 280, 330, True),
            Crop(0, 0, 100, 200)]


def test_resized_crops_fixed_boxes_match_pil_and_have_teeth(photos):
    size = 224
    for name, path in photos.items():
        pil = load_rgb(path)
        img = decode([path.read_bytes()], "cpu")[0]
        h, w = img.shape[1:]
        boxes = fixed_boxes(h, w)
        x = resized_crops([img] * len(boxes), boxes, size)
        assert x.shape == (len(boxes), 3, size, size) and x.dtype == torch.float32
        for c, xi in zip(boxes, x):
            ref = pil_crop(pil, c, size)
            mean, mx = diff(xi, ref)
            tol_mean, tol_max = tolerance(factor(c, size))
            assert mean < tol_mean and mx < tol_max, (name, c, mean, mx)
            # teeth: the box one pixel down (or up at the border), the other flip, no
            # normalisation: each fails the tolerance
            top = c.top + 1 if c.top + c.height < h else c.top - 1
            shifted = Crop(top, c.left, c.height, c.width, c.flip)
            left = c.left + 1 if c.left + c.width < w else c.left - 1
            shifted_x = Crop(c.top, left, c.height, c.width, c.flip)
            for wrong in (shifted, shifted_x, Crop(c.top, c.left, c.height, c.width, not c.flip)):
                assert diff(resized_crops([img], [wrong], size)[0], ref)[0] > tol_mean, \
                    (name, c, wrong)
            plain = resized_crops([img], [c], size)[0] * 0.226 + 0.449  # ~un-normalised
            assert diff(plain, ref)[0] > tol_mean


def test_resized_crops_flips_argument_overrides(photos):
    img = decode([photos["coffee"].read_bytes()], "cpu")[0]
    c = Crop(50, 60, 200, 210, False)
    a = resized_crops([img], [c], 64, flips=[True])
    b = resized_crops([img], [(50, 60, 200, 210)], 64)
    assert torch.allclose(a, b.flip(-1))


def test_random_crops_match_train_transform(photos):
    """SeededDraws + train_transform (the CPU path) vs crop_params + resized_crops on the
    same draws: every draw within its downscale factor's tolerance."""
    worst: dict[float, float] = {}
    for name, path in photos.items():
        ds = SeededDraws(ImageListDataset([(path, 0)], train_transform(224)), seed=7)
        img = decode([path.read_bytes()], "cpu")[0]
        for epoch in (0, 3):
            ds.set_epoch(epoch)
            cpu = [ds[(draw, 0)][0] for draw in range(25)]
            crops = [crop_params(derive_seed(7, epoch, d), *img.shape[1:]) for d in range(25)]
            x = resized_crops([img] * 25, crops, 224)
            for c, xi, ref in zip(crops, x, cpu):
                mean, mx = diff(xi, ref)
                top = next(t for t, *_ in TOLERANCE if factor(c, 224) <= t)
                worst[top] = max(worst.get(top, 0.0), mean)
                tol_mean, tol_max = tolerance(factor(c, 224))
                assert mean < tol_mean and mx < tol_max, (name, epoch, c, mean, mx)
    print("worst mean |diff| by downscale bucket:", worst, file=sys.stderr)


def test_center_crops_match_eval_transform(photos):
    for resize, size in ((256, 224), (72, 64), (224, 224)):
        imgs = [decode([p.read_bytes()], "cpu")[0] for p in photos.values()]
        x = center_crops(imgs, resize, size)
        for img, xi, path in zip(imgs, x, photos.values()):
            ref = eval_transform(resize, size)(load_rgb(path))
            s = min(img.shape[1:]) / resize
            mean, mx = diff(xi, ref)
            tol_mean, tol_max = tolerance(s)
            assert mean < tol_mean and mx < tol_max, (path.name, resize, size, mean, mx)


def test_center_crops_teeth_on_upsampled_images():
    """Upsampling (s < 1): PIL and roi_align are both bilinear, the bound is tight and a
    crop one pixel off fails it."""
    rng = np.random.default_rng(1)
    a = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((3, 3, 1))).astype(np.uint8)
    pil = Image.fromarray(a)  # 36 x 48 blocks: texture at every scale
    img = chw(pil)
    ref = eval_transform(72, 64)(pil)
    x = center_crops([img], 72, 64)[0]
    mean, mx = diff(x, ref)
    assert mean < TOLERANCE[0][1] and mx < TOLERANCE[0][2], (mean, mx)
    shifted = eval_transform(72, 64)(pil.crop((1, 0, 48, 36)).resize((48, 36)))
    assert diff(x, shifted)[0] > TOLERANCE[0][1]


def test_groups_split_large_batches(photos):
    """A batch split into several roi_align calls (tiny budget) gives the same pixels."""
    import pretrain.gpu_data as gd

    imgs = [decode([p.read_bytes()], "cpu")[0] for p in photos.values()]
    boxes = [crop_params(s, *img.shape[1:]) for s, img in enumerate(imgs)]
    regions = [img[:, c.top:c.top + c.height, c.left:c.left + c.width]
               for img, c in zip(imgs, boxes)]
    rois = [(0.0, 0.0, float(c.width), float(c.height)) for c in boxes]
    one = gd.roi_resize(regions, rois, 32)
    split = gd.roi_resize(regions, rois, 32, budget=1)
    assert len(gd._groups([tuple(r.shape[1:]) for r in regions], 1)) == len(imgs)
    assert torch.allclose(one, split, atol=1e-4)


# --------------------------------------------------------------------------- GpuBatches


def image_folder(photos: dict[str, Path], tmp_path: Path, n: int = 10) -> list[Path]:
    """n JPEGs of different sizes, cut from the photos."""
    out = []
    for i in range(n):
        src = Image.open(list(photos.values())[i % len(photos)]).convert("RGB")
        w, h = src.size
        im = src.crop((i * 7, i * 5, w - i * 11, h - i * 3))
        out.append(tmp_path / f"{i:03d}.JPEG")
        im.save(out[-1], quality=90)
    return out


def test_gpu_batches_eval_equal_extraction_inputs(photos, tmp_path):
    files = image_folder(photos, tmp_path, 11)
    ds = ImageListDataset([(p, 0) for p in files], eval_transform(256, 224))
    cpu = [x for x, _, _ in DataLoader(ds, batch_size=4, shuffle=False)]
    gpu = GpuInputs(images_of(ds), 224, 256, torch.device("cpu")).extraction(range(11), 4)
    assert len(gpu) == len(cpu) == 3
    got = list(gpu)
    assert [len(x) for x in got] == [4, 4, 3]
    for x, ref in zip(got, cpu):
        for xi, ri, path in zip(x, ref, files):
            s = min(Image.open(path).size) / 256
            mean, mx = diff(xi, ri)
            assert mean < tolerance(s)[0] and mx < tolerance(s)[1], (path, mean, mx)
    # a shard (a rank's contiguous block) gives those images' rows only
    part = list(GpuInputs(images_of(ds), 224, 256, torch.device("cpu")).extraction([5, 6, 7], 2))
    assert torch.allclose(torch.cat(part), torch.cat(got)[5:8])


def test_gpu_batches_train_same_draws_as_cpu_path(photos, tmp_path):
    """The DataLoader over SeededDraws(PseudoLabelled) with rank_batches (train.py's CPU
    path) vs GpuBatches on the same batches: the same labels, the same boxes and flips."""
    files = image_folder(photos, tmp_path, 8)
    ds = ImageListDataset([(p, -1) for p in files], train_transform(224))
    assign = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    order = [5, 0, 7, 7, 2, 3, 1, 6, 4, 2]
    seed, epoch = derive_seed(31, "crops"), 2
    draws = SeededDraws(PseudoLabelled(ds, assign), seed)
    draws.set_epoch(epoch)
    inputs = GpuInputs(images_of(ds), 224, 256, torch.device("cpu"))
    for dist in (Dist(), Dist(1, 2)):
        batches = rank_batches(list(EnumeratedSampler(order)), 4, dist)
        cpu = list(DataLoader(draws, batch_sampler=batches, num_workers=0))
        gpu = list(inputs.training(batches, assign, seed, epoch))
        assert len(gpu) == len(cpu)
        for (x, y), (rx, ry), batch in zip(gpu, cpu, batches):
            assert y.dtype == torch.int64 and torch.equal(y, ry)
            for xi, ri, (draw, i) in zip(x, rx, batch):
                h, w = load_rgb(files[i]).size[::-1]
                c = crop_params(derive_seed(seed, epoch, draw), h, w)
                mean, mx = diff(xi, ri)
                tol = tolerance(factor(c, 224))
                assert mean < tol[0] and mx < tol[1], (draw, i, c, mean, mx)
                flipped = diff(xi.flip(-1), ri)[0]  # the flip agrees: the other one fails
                assert flipped > tol[0], (draw, i, c)


def test_gpu_batches_array_dataset():
    """Fashion-MNIST-like grey arrays: upsampling only, the tight tolerance everywhere."""
    rng = np.random.default_rng(0)
    images = np.kron(rng.integers(0, 256, (6, 7, 7)), np.ones((1, 4, 4))).astype(np.uint8)
    labels = np.arange(6) % 3
    ds_eval = ArrayImageDataset(images, labels, eval_transform(72, 64))
    inputs = GpuInputs(images_of(ds_eval), 64, 72, torch.device("cpu"))
    x = torch.cat(list(inputs.extraction(range(6), 4)))
    ref = torch.stack([ds_eval[i][0] for i in range(6)])
    mean, mx = diff(x, ref)
    assert mean < TOLERANCE[0][1] and mx < TOLERANCE[0][2], (mean, mx)
    draws = SeededDraws(PseudoLabelled(ArrayImageDataset(images, labels, train_transform(64)),
                                       labels), 11)
    draws.set_epoch(1)
    batches = [[(0, 2), (1, 2), (2, 5)], [(3, 0)]]
    for (x, y), batch in zip(inputs.training(batches, labels, 11, 1), batches):
        ref = torch.stack([draws[key][0] for key in batch])
        assert torch.equal(y, torch.as_tensor(labels[[i for _, i in batch]]))
        for xi, ri, (draw, _) in zip(x, ref, batch):
            c = crop_params(derive_seed(11, 1, draw), 28, 28)
            mean, mx = diff(xi, ri)
            assert mean < TOLERANCE[0][1] and mx < TOLERANCE[0][2], (c, mean, mx)


def test_gpu_batches_reader_error_is_the_user_error(photos, tmp_path):
    files = image_folder(photos, tmp_path, 3)
    files.insert(2, tmp_path / "gone.JPEG")
    first = next(iter(GpuInputs(files, 32, 40, torch.device("cpu")).extraction(range(4), 2)))
    assert first.shape == (2, 3, 32, 32)  # the batch before the missing file is made
    with pytest.raises(UserError, match="gone.JPEG"):
        list(GpuInputs(files, 32, 40, torch.device("cpu")).extraction(range(4), 2))
    # stopping early ends the reader thread
    it = iter(GpuInputs(files[:2], 32, 40, torch.device("cpu"), prefetch=1).extraction(
        [0, 1, 0, 1, 0, 1], 1))
    next(it)
    it.close()


# --------------------------------------------------------------------------- wiring


def test_loader_setting():
    assert PretrainConfig.loader == "cpu" and "loader" not in PretrainConfig.SHAPE_FIELDS
    with pytest.raises(UserError, match="--loader must be auto, cpu or gpu"):
        PretrainConfig(dataset="fashion-mnist", loader="dali").validate()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    folder = PretrainConfig(data="/x", loader="auto")
    assert resolve_loader(PretrainConfig(data="/x"), cuda) == "cpu"  # the default
    assert resolve_loader(folder, cpu) == "cpu"
    assert resolve_loader(folder, cuda) == "gpu"
    assert resolve_loader(PretrainConfig(dataset="fashion-mnist", loader="auto"), cuda) == "cpu"
    assert resolve_loader(PretrainConfig(data="/x", loader="cpu"), cuda) == "cpu"
    assert resolve_loader(PretrainConfig(dataset="fashion-mnist", loader="gpu"), cuda) == "gpu"
    with pytest.raises(UserError, match="use --loader cpu"):
        resolve_loader(PretrainConfig(data="/x", loader="gpu"), cpu)


def test_loader_flag():
    from pretrain.__main__ import build_parser

    args = build_parser().parse_args(["--out", "x", "--loader", "cpu"])
    assert args.loader == "cpu"
    assert build_parser().parse_args(["--out", "x"]).loader is None


def test_run_refuses_gpu_loader_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    from pretrain.train import run

    cfg = PretrainConfig(dataset="fashion-mnist", subset=20, k=2, epochs=1, device="cpu",
                         loader="gpu", arch="vgg16", input_size=32, resize_size=32, fc_dim=8,
                         pca_dim=4)
    with pytest.raises(UserError, match="--loader gpu .* use --loader cpu"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_extract_features_with_gpu_inputs(photos, tmp_path):
    """train.extract_features through GpuInputs gives the CPU path's features within the
    pixel tolerance's effect (a random AlexNet, relative difference)."""
    from pretrain.models import ModelSpec, build_model
    from pretrain.train import extract_features

    files = image_folder(photos, tmp_path, 6)
    ds = ImageListDataset([(p, 0) for p in files], eval_transform(256, 224))
    torch.manual_seed(0)
    model = build_model(ModelSpec("alexnet", True, 32, None))
    cpu = extract_features(model, ds, 4, 0, torch.device("cpu"))
    gpu = extract_features(model, ds, 4, 0, torch.device("cpu"),
                           gpu=GpuInputs(images_of(ds), 224, 256, torch.device("cpu")))
    assert gpu.shape == cpu.shape
    rel = np.linalg.norm(gpu - cpu, axis=1) / np.linalg.norm(cpu, axis=1)
    other = np.linalg.norm(cpu - np.roll(cpu, 1, axis=0), axis=1) / np.linalg.norm(cpu, axis=1)
    print("relative feature difference", rel.max(), "between images", other.min(),
          file=sys.stderr)
    # measured 0.12 at most (the astronaut, downscaled 2x: roi_align's box vs PIL's
    # triangle), 0.47 between different images
    assert rel.max() < 0.2 and rel.max() < other.min() / 3, (rel, other)


# --------------------------------------------------------------------------- DALI


dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed "
                          "(pip install nvidia-dali-cuda120, the 'gpu' extra)")


@dali
def test_dali_center_crops_match_eval_transform(photos):
    """DALI's antialiased linear resize is PIL's filter (measured mean 0.003). Its geometry
    rounds the longer resized side and the centre-crop anchor to nearest where torchvision
    truncates / rounds half to even, half a pixel apart on some shapes (e.g. 300 x 451:
    385 px wide, crop at 81 vs 384 and 80): compared on shapes where both agree."""
    from pretrain.gpu_data import DaliCrops

    paths = [photos["astronaut"], photos["coffee"]]  # 512 x 512, 400 x 600: exact geometry
    crops = DaliCrops("eval", 224, len(paths), resize=256)
    x, boxes = crops([p.read_bytes() for p in paths])
    assert boxes is None and x.shape == (len(paths), 3, 224, 224)
    for xi, path in zip(x, paths):
        ref = eval_transform(256, 224)(load_rgb(path))
        mean, mx = diff(xi, ref)
        assert mean < 0.008 and mx < 0.2, (path.name, mean, mx)
        shifted = eval_transform(256, 224)(load_rgb(path).crop((1, 0, *load_rgb(path).size)))
        assert diff(xi, shifted)[0] > 0.008


@dali
def test_dali_random_crops(photos, tmp_path):
    """DALI's boxes: torchvision's distribution (KS over 5000 draws); its pixels: PIL's crop
    of the box it reports (so the box is read the right way round)."""
    from pretrain.gpu_data import DaliCrops

    h, w = 75, 100
    small = tmp_path / "small.jpg"
    Image.open(photos["coffee"]).convert("RGB").resize((w, h)).save(small, quality=95)
    crops = DaliCrops("train", 16, 500, seed=3)
    data = small.read_bytes()
    boxes = []
    for _ in range(10):
        boxes += crops([data] * 500)[1]
    with torch.random.fork_rng():
        torch.manual_seed(2024)
        ref = [T.RandomResizedCrop.get_params(Image.new("RGB", (w, h)), [0.08, 1.0],
                                              [3 / 4, 4 / 3])[2:] for _ in range(5000)]
    ours = [(c.height, c.width) for c in boxes]
    for a, b in zip(box_stats(ours, h, w), box_stats(ref, h, w)):
        assert ks_2samp(a, b).pvalue > 0.01
    assert abs(np.mean([c.flip for c in boxes]) - 0.5) < 0.03
    big = DaliCrops("train", 224, 4, seed=5)
    pil = {p: load_rgb(p) for p in photos.values()}
    x, boxes = big([p.read_bytes() for p in photos.values()])
    for xi, c, path in zip(x, boxes, photos.values()):
        ref = pil_crop(pil[path], c, 224)
        mean, mx = diff(xi, ref)
        tol = tolerance(factor(c, 224))
        assert mean < tol[0] + 0.01, (path.name, c, mean, mx)
