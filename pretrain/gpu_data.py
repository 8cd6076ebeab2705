"""The GPU input pipeline of pretraining (issue 13): decode, crop, resize and normalise
batches on the training device instead of PIL in DataLoader workers.

* :func:`crop_params` -- the RandomResizedCrop box and the flip of one draw, identical to
  those the CPU path (:class:`dcbench.core.SeededDraws` + :func:`dcbench.core.train_transform`)
  draws for the same seed.
* :func:`decode` -- file bytes to uint8 CHW RGB tensors on a device: batched nvJPEG on CUDA,
  torchvision's decoders on CPU; what they cannot read as 8-bit RGB (CMYK JPEG, 16-bit PNG,
  a corrupt file) goes through :func:`pretrain.data.load_rgb`, as on the CPU path.
* :func:`resized_crops` / :func:`center_crops` -- the training and extraction crops of a batch
  in :func:`torchvision.ops.roi_align` calls (bilinear, adaptive sampling: a box average when
  downscaling), flipped and normalised with ImageNet's mean and std.
* :class:`GpuBatches` -- batches of an epoch (training: ``(x, y)``; extraction: ``x``), files
  read by a background thread a few batches ahead.
* :class:`DaliCrops` -- the same crops with NVIDIA DALI when it is installed (optional).

Pixels differ from PIL's by the resampling filter (roi_align's box of bilinear samples vs
PIL's antialiased triangle) and PIL's rounding to uint8: tests/test_gpu_data.py measures it.
"""
from __future__ import annotations

import io
import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.ops import roi_align

from dcbench.core import IMAGENET_MEAN, IMAGENET_STD, UserError, derive_seed

from .data import load_rgb

# padded pixels of one roi_align call (x 3 channels x 4 bytes: 400 MB); larger batches are
# split into several calls (ImageNet holds a few images of several thousand pixels a side)
GROUP_PIXELS = 1 << 25
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class Crop:
    """A crop box in pixels of the decoded image, and whether the crop is flipped."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False


# --------------------------------------------------------------------------- random crops


def crop_params(draw_seed: int, height: int, width: int,
                scale: tuple[float, float] = (0.08, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Crop:
    """The box and flip that ``train_transform`` draws from torch's CPU RNG seeded with
    ``draw_seed`` (``RandomResizedCrop.get_params`` then ``RandomHorizontalFlip``'s
    ``torch.rand(1)``), drawn in the same order from a private generator."""
    g = torch.Generator().manual_seed(draw_seed)
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    box = None
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1],
                                                   generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            box = (top, left, h, w)
            break
    if box is None:  # torchvision's fallback: a centre crop, the ratio clamped
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            h, w = height, int(round(height * max(ratio)))
        else:
            h, w = height, width
        box = ((height - h) // 2, (width - w) // 2, h, w)
    return Crop(*box, flip=bool(torch.rand(1, generator=g).item() < 0.5))


def center_box(height: int, width: int, resize: int, size: int) -> tuple[float, ...]:
    """``eval_transform``'s crop (Resize shorter side to ``resize`` -- the longer one
    truncated as torchvision does --, CenterCrop ``size``) as (x0, y0, x1, y1) in the
    original image's pixels."""
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_h, new_w = resize, int(resize * width / height)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    sy, sx = height / new_h, width / new_w
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


# --------------------------------------------------------------------------- decoding


def jpeg_components(data: bytes | torch.Tensor) -> int | None:
    """Colour components of a JPEG from its frame header (1 grey, 3 YCbCr, 4 CMYK); None for
    data that is not a JPEG or whose header cannot be read."""
    b = memoryview(data.numpy() if isinstance(data, torch.Tensor) else data)
    if len(b) < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= len(b):
        if b[pos] != 0xFF:
            return None
        marker = b[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        length = (b[pos + 2] << 8) | b[pos + 3]
        if marker in _SOF:
            return b[pos + 9] if pos + 9 < len(b) else None
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame
            return None
        pos += 2 + length
    return None


def _as_tensor(data: bytes | torch.Tensor) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _fallback(data: torch.Tensor, name: str | Path | None) -> torch.Tensor:
    """PIL's reading (the CPU path's), as a uint8 CHW tensor; a corrupt file's UserError."""
    img = load_rgb(name if name is not None else io.BytesIO(data.numpy().tobytes()))
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _decode_cpu(data: torch.Tensor, name: str | Path | None) -> torch.Tensor:
    if jpeg_components(data) == 4:  # CMYK: PIL's conversion, as the CPU path
        return _fallback(data, name)
    try:
        img = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        return _fallback(data, name)
    return img if img.dtype == torch.uint8 else _fallback(data, name)  # 16-bit: to_8bit


def decode(files: Sequence[bytes | torch.Tensor], device: torch.device | str,
           names: Sequence[str | Path] | None = None) -> list[torch.Tensor]:
    """uint8 RGB images [3, H, W] on ``device`` from encoded files. CUDA: the grey and YCbCr
    JPEGs in one batched nvJPEG call; every other file, and any file nvJPEG refuses, through
    the CPU decoders. ``names`` (the files' paths) name a corrupt file in its UserError."""
    device = torch.device(device)
    data = [_as_tensor(f) for f in files]
    out: list[torch.Tensor | None] = [None] * len(data)
    if device.type == "cuda":
        jpegs = [i for i, d in enumerate(data) if jpeg_components(d) in (1, 3)]
        if jpegs:
            try:
                imgs = decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB,
                                   device=device)
            except RuntimeError:  # one bad file fails the batch: decode them one by one
                imgs = []
                for i in jpegs:
                    try:
                        imgs.append(decode_jpeg(data[i], mode=ImageReadMode.RGB, device=device))
                    except RuntimeError:
                        imgs.append(None)
            for i, img in zip(jpegs, imgs):
                out[i] = img
    for i, img in enumerate(out):
        if img is None:
            out[i] = _decode_cpu(data[i], names[i] if names is not None else None).to(device)
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- crops


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8-range floats [B, 3, h, w] -> ToTensor + Normalize(IMAGENET_MEAN, IMAGENET_STD)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return (x - mean) / std


def _groups(sizes: Sequence[tuple[int, int]], budget: int) -> list[list[int]]:
    """Indices split into runs (by increasing area) whose padded batch holds <= ``budget``
    pixels (a run holds at least one image)."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i][0] * sizes[i][1])
    groups: list[list[int]] = []
    hmax = wmax = 0
    for i in order:
        h, w = sizes[i][0] + 1, sizes[i][1] + 1
        nh, nw = max(hmax, h), max(wmax, w)
        if groups and (len(groups[-1]) + 1) * nh * nw <= budget:
            groups[-1].append(i)
            hmax, wmax = nh, nw
        else:
            groups.append([i])
            hmax, wmax = h, w
    return groups


def roi_resize(regions: Sequence[torch.Tensor], rois: Sequence[tuple[float, float, float, float]],
               size: int, budget: int = GROUP_PIXELS) -> torch.Tensor:
    """Float [B, 3, size, size] (0..255): box ``rois[i]`` = (x0, y0, x1, y1) of uint8
    ``regions[i]`` [3, h, w] resampled by roi_align (aligned pixel centres, adaptive sampling
    ratio). The regions are padded into batches with one replicated row and column, so samples
    at a region's border read the border pixel (as PIL does) rather than the padding."""
    device = regions[0].device
    out = torch.empty(len(regions), 3, size, size, device=device)
    for g in _groups([tuple(r.shape[1:]) for r in regions], budget):
        hmax = max(regions[i].shape[1] for i in g) + 1
        wmax = max(regions[i].shape[2] for i in g) + 1
        batch = torch.zeros(len(g), 3, hmax, wmax, dtype=torch.uint8, device=device)
        for k, i in enumerate(g):
            r = regions[i]
            batch[k, :, :r.shape[1] + 1, :r.shape[2] + 1] = torch.nn.functional.pad(
                r, (0, 1, 0, 1), mode="replicate")
        boxes = torch.tensor([[k, *rois[i]] for k, i in enumerate(g)], dtype=torch.float32,
                             device=device)
        out[torch.tensor(g, device=device)] = roi_align(
            batch.float(), boxes, (size, size), spatial_scale=1.0, sampling_ratio=0,
            aligned=True)
    return out


def resized_crops(images: Sequence[torch.Tensor], boxes: Sequence[Crop | tuple], size: int,
                  flips: Sequence[bool] | None = None) -> torch.Tensor:
    """RandomResizedCrop's output for given boxes: each box (a :class:`Crop` or (top, left,
    height, width)) of its uint8 [3, H, W] image resized to ``size`` x ``size`` (the box cut
    out first, as PIL's crop-then-resize), flipped where ``flips`` (default: the Crops' flip)
    says, normalised: float [B, 3, size, size] on the images' device."""
    crops = [Crop(*b) if not isinstance(b, Crop) else b for b in boxes]
    regions = [img[:, c.top:c.top + c.height, c.left:c.left + c.width]
               for img, c in zip(images, crops)]
    x = roi_resize(regions, [(0.0, 0.0, float(c.width), float(c.height)) for c in crops], size)
    flips = [c.flip for c in crops] if flips is None else list(flips)
    if any(flips):
        f = torch.tensor(flips, device=x.device)
        x[f] = x[f].flip(-1)
    return _normalise(x)


def center_crops(images: Sequence[torch.Tensor], resize: int, size: int) -> torch.Tensor:
    """``eval_transform(resize, size)`` of uint8 [3, H, W] images: float [B, 3, size, size]."""
    rois = [center_box(img.shape[1], img.shape[2], resize, size) for img in images]
    return _normalise(roi_resize(images, rois, size))


# --------------------------------------------------------------------------- batches


def read_file(path: str | Path) -> torch.Tensor:
    """A file's bytes as a uint8 tensor; an unreadable file is load_rgb's UserError."""
    try:
        return torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except OSError:
        load_rgb(path)  # raises the suite's message (missing, permission, not a file)
        raise


def images_of(dataset) -> Sequence[Path] | np.ndarray:
    """The image files (``ImageListDataset``) or uint8 array (``ArrayImageDataset``) of a
    pretraining dataset, what :class:`GpuBatches` reads."""
    if hasattr(dataset, "samples"):
        return [p for p, _ in dataset.samples]
    return dataset.images


@dataclass
class GpuBatches:
    """One pass of batches made on ``device``.

    ``images``: image files, or a uint8 array [N, H, W] (grey) / [N, H, W, 3].
    ``batches``: (draw, index) pairs per batch, as ``rank_batches`` gives them (extraction:
    the draw is unused). ``mode`` ``train`` yields ``(x, labels[index])`` with the crop of
    ``crop_params(derive_seed(seed, epoch, draw), ...)`` -- ``seed`` is the one the CPU path
    gives ``SeededDraws`` --; ``eval`` yields ``x``, ``eval_transform(resize, size)``'s crops.
    Files are read by a background thread ``prefetch`` batches ahead (pinned on CUDA).
    """

    images: Sequence[str | Path] | np.ndarray
    batches: Sequence[Sequence[tuple[int, int]]]
    mode: str
    size: int
    device: torch.device
    resize: int = 0
    labels: np.ndarray | None = None
    seed: int = 0
    epoch: int = 0
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.mode not in ("train", "eval"):
            raise ValueError(f"mode must be train or eval, not {self.mode!r}")
        if self.mode == "train" and self.labels is None:
            raise ValueError("train mode needs labels (the epoch's pseudo-labels)")
        if self.mode == "eval" and self.resize < self.size:
            raise ValueError(f"eval mode needs resize >= size (got {self.resize}, {self.size})")
        self.device = torch.device(self.device)

    def __len__(self) -> int:
        return len(self.batches)

    def _read(self, batch: Sequence[tuple[int, int]]):
        """Background thread: the raw batch (file bytes, or the array's images)."""
        idx = [i for _, i in batch]
        pin = self.device.type == "cuda"
        if isinstance(self.images, np.ndarray):
            a = torch.from_numpy(np.ascontiguousarray(self.images[idx]))
            return a.pin_memory() if pin else a
        data = [read_file(self.images[i]) for i in idx]
        return [d.pin_memory() for d in data] if pin else data

    def _images(self, batch, raw) -> list[torch.Tensor]:
        if isinstance(raw, torch.Tensor):  # array images: [B, H, W(, 3)]
            a = raw.to(self.device, non_blocking=True)
            a = a.unsqueeze(1).expand(-1, 3, -1, -1) if a.ndim == 3 else a.permute(0, 3, 1, 2)
            return list(a.unbind(0))
        return decode(raw, self.device, [self.images[i] for _, i in batch])

    def _make(self, batch, raw):
        imgs = self._images(batch, raw)
        if self.mode == "eval":
            return center_crops(imgs, self.resize, self.size)
        crops = [crop_params(derive_seed(self.seed, self.epoch, draw), img.shape[1],
                             img.shape[2]) for (draw, _), img in zip(batch, imgs)]
        y = torch.as_tensor(self.labels[[i for _, i in batch]], dtype=torch.int64)
        return resized_crops(imgs, crops, self.size), y

    def __iter__(self) -> Iterator:
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in self.batches:
                    if not put(("batch", self._read(batch))):
                        return
                put(("end", None))
            except BaseException as e:  # noqa: BLE001 - raised in the consumer
                put(("error", e))

        reader = threading.Thread(target=produce, name="gpu-batches-reader", daemon=True)
        reader.start()
        try:
            for batch in self.batches:
                kind, raw = q.get()
                if kind == "error":
                    raise raw
                yield self._make(batch, raw)
        finally:
            stop.set()
            reader.join()


@dataclass(frozen=True)
class GpuInputs:
    """A run's GPU input pipeline: its images (:func:`images_of`), crop sizes and device;
    makes each epoch's :class:`GpuBatches`."""

    images: Sequence[str | Path] | np.ndarray
    size: int
    resize: int
    device: torch.device
    prefetch: int = 2

    def extraction(self, indices: Sequence[int], batch_size: int) -> GpuBatches:
        """``extract_features``' batches: ``indices`` in order, ``batch_size`` at a time."""
        idx = [int(i) for i in indices]
        batches = [list(enumerate(idx[s:s + batch_size], s))
                   for s in range(0, len(idx), batch_size)]
        return GpuBatches(self.images, batches, "eval", self.size, self.device,
                          resize=self.resize, prefetch=self.prefetch)

    def training(self, batches: Sequence[Sequence[tuple[int, int]]], labels: np.ndarray,
                 seed: int, epoch: int) -> GpuBatches:
        """One epoch's training batches ((draw, index) pairs, e.g. ``rank_batches``)."""
        return GpuBatches(self.images, batches, "train", self.size, self.device,
                          labels=labels, seed=seed, epoch=epoch, prefetch=self.prefetch)


# --------------------------------------------------------------------------- DALI


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class DaliCrops:
    """Training or extraction crops of encoded files with NVIDIA DALI: ``mixed`` decoding
    (nvJPEG) on a GPU (``device_id``), DALI's CPU backend when ``device_id`` is None.

    ``train``: DALI draws the boxes (``fn.random_crop_generator``: area ``scale``, aspect
    ``ratio``, 10 attempts, as RandomResizedCrop -- the same distribution, not the CPU path's
    exact boxes) and decodes only them; ``eval``: shorter side to ``resize``, centre crop.
    Both resize with antialiased bilinear filtering, flip (train) and normalise.
    """

    mode: str
    size: int
    batch_size: int
    resize: int = 0
    device_id: int | None = None
    seed: int = 0
    threads: int = 2
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        from nvidia.dali import fn, pipeline_def, types

        dec = "cpu" if self.device_id is None else "mixed"
        mean = [m * 255 for m in IMAGENET_MEAN]
        std = [s * 255 for s in IMAGENET_STD]

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads,
                      device_id=self.device_id, seed=self.seed % (2**31),
                      exec_dynamic=True, prefetch_queue_depth=1)
        def pipe():
            data = fn.external_source(name="files", dtype=types.UINT8, ndim=1)
            if self.mode == "train":
                anchor, shape = fn.random_crop_generator(
                    fn.peek_image_shape(data), random_area=list(self.scale),
                    random_aspect_ratio=list(self.ratio), num_attempts=10)
                img = fn.decoders.image_slice(data, anchor, shape, device=dec,
                                              output_type=types.RGB, axis_names="HW",
                                              normalized_anchor=False, normalized_shape=False)
                img = fn.resize(img, resize_x=self.size, resize_y=self.size,
                                interp_type=types.INTERP_LINEAR, antialias=True)
                mirror = fn.random.coin_flip(probability=0.5)
            else:
                img = fn.decoders.image(data, device=dec, output_type=types.RGB)
                img = fn.resize(img, resize_shorter=self.resize,
                                interp_type=types.INTERP_LINEAR, antialias=True)
                anchor = shape = mirror = fn.random.coin_flip(probability=0.0)
            x = fn.crop_mirror_normalize(img, crop=(self.size, self.size), crop_pos_x=0.5,
                                         crop_pos_y=0.5, mirror=mirror, mean=mean, std=std,
                                         dtype=types.FLOAT, output_layout="CHW")
            return x, anchor, shape, mirror

        self.pipe = pipe()
        self.pipe.build()

    def __call__(self, files: Sequence[bytes | np.ndarray]
                 ) -> tuple[torch.Tensor, list[Crop] | None]:
        """(normalised float [B, 3, size, size] on the CPU, the boxes drawn in train mode) of
        ``B <= batch_size`` encoded ``files``."""
        if not files or len(files) > self.batch_size:
            raise UserError(f"DALI batches hold 1..{self.batch_size} files, got {len(files)}.")
        arrays = [np.frombuffer(f, dtype=np.uint8) if isinstance(f, bytes) else f
                  for f in files]
        self.pipe.feed_input("files", arrays)
        outs = self.pipe.run()
        x, anchor, shape, mirror = (o.as_cpu() if hasattr(o, "as_cpu") else o for o in outs)
        n = len(files)
        xs = torch.stack([torch.from_numpy(np.array(x.at(i))) for i in range(n)])
        if self.mode != "train":
            return xs, None
        crops = [Crop(*(int(v) for v in np.array(anchor.at(i))),
                      *(int(v) for v in np.array(shape.at(i))), bool(np.array(mirror.at(i))))
                 for i in range(n)]
        return xs, crops
