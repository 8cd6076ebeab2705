"""Export a checkpoint of this suite for detectron2, mmsegmentation or torchvision.

``python -m evaluations.export --ckpt X --to detectron2|mmseg|torchvision --out FILE`` reads
any checkpoint :func:`pretrain.checkpoint.load_checkpoint` reads (ours, the authors' released
files, plain state dicts) and writes one file, atomically. The clustering head ``top_layer``
is never exported. Key names ("trunk" = ``sobel.*``, ``features.*`` for AlexNet/VGG16,
``stem.*``, ``layer1..4.*`` for ResNet-50, i.e. our module paths; fc6/fc7 = the Linear layers
``classifier.1/.4`` of AlexNet, ``classifier.0/.3`` of VGG16; ResNet-50 has none):

* ``detectron2`` -- a ``.pkl`` pickle ``{"model": {name: numpy array}, "__author__": ...,
  "matching_heuristics": False, "dcbench": {metadata}}``, which
  ``DetectionCheckpointer._load_file`` returns as is and loads by name. Trunk tensors are
  ``backbone.<trunk key>`` (a custom ``Backbone`` whose attributes are our modules);
  fc6/fc7 are ``roi_heads.box_head.fc1.*`` / ``fc2.*`` of ``FastRCNNConvFCHead``, which
  flattens the pooled C x S x S RoI features in torch order, so the Linear weights carry over
  unchanged with ``POOLER_RESOLUTION`` S = 6 (AlexNet) or 7 (VGG16). ``num_batches_tracked``
  is dropped (BN running stats are kept). Arrays are pickled as ``numpy.ndarray(shape, dtype,
  bytearray)``, so NumPy 1.x reads a file written under NumPy 2.
* ``mmseg`` -- ``torch.save`` of ``{"state_dict": {trunk key: tensor}, "meta": {metadata}}``
  with no prefix: mmengine's ``PretrainedInit`` without ``prefix`` loads it into the backbone
  with ``strict=False``. fc6/fc7 are added convolutionalised (FCN style): ``fc6.weight``
  [fc_dim, C, S, S] (the Linear weight reshaped in torch's flatten order), ``fc7.weight``
  [fc_dim, fc_dim, 1, 1], with ``fc6.bias``/``fc7.bias``; a backbone without ``fc6``/``fc7``
  modules ignores them (strict=False).
* ``torchvision`` -- ``torch.save`` of a plain state dict with exactly the keys of
  ``build_model(ModelSpec(arch, sobel, fc_dim)).state_dict()`` (``top_layer`` dropped); VGG16
  ``features.*`` follow torchvision's ``vgg16_bn`` layout. The spec is printed, not stored.

Every file loads with ``torch.load(..., weights_only=True)`` (detectron2's with ``pickle``).
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dcbench.core import UserError, atomic_open, file_sha256
from pretrain.checkpoint import LoadedCheckpoint, atomic_torch_save, load_checkpoint
from pretrain.models import ARCHS, ModelSpec, TapNet

FORMATS = ("detectron2", "mmseg", "torchvision")
FC_INDEX = {"alexnet": (1, 4), "vgg16": (0, 3)}  # classifier index of fc6, fc7
POOL5_SIZE = {"alexnet": 6, "vgg16": 7}  # S: pool5 is C x S x S
D2_BACKBONE = "backbone."
D2_FC = ("roi_heads.box_head.fc1", "roi_heads.box_head.fc2")
D2_AUTHOR = "dcbench (DeepCluster benchmark suite)"
NBT = "num_batches_tracked"


@dataclass(frozen=True)
class Parts:
    """A network's tensors split into the trunk and the fc6/fc7 Linear layers."""

    spec: ModelSpec
    trunk: dict[str, torch.Tensor]  # our module paths, no classifier / top_layer
    fc: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (weight, bias) of fc6, fc7; () ResNet


@dataclass(frozen=True)
class Written:
    path: Path
    fmt: str
    keys: int
    spec: ModelSpec

    def line(self) -> str:
        s = self.spec
        return (f"wrote {self.path} ({self.fmt}, {self.keys} keys; arch={s.arch} "
                f"sobel={s.sobel} fc_dim={s.fc_dim})")


def split(model: TapNet) -> Parts:
    sd = model.state_dict()
    fc = tuple((sd[f"classifier.{i}.weight"], sd[f"classifier.{i}.bias"])
               for i in FC_INDEX.get(model.spec.arch, ()))
    trunk = {k: v for k, v in sd.items() if not k.startswith(("classifier.", "top_layer."))}
    return Parts(model.spec, trunk, fc)


def detectron2_weights(parts: Parts) -> dict[str, np.ndarray]:
    out = {D2_BACKBONE + k: v.numpy() for k, v in parts.trunk.items() if not k.endswith(NBT)}
    for name, (w, b) in zip(D2_FC, parts.fc):
        out[f"{name}.weight"], out[f"{name}.bias"] = w.numpy(), b.numpy()
    return out


def mmseg_weights(parts: Parts) -> dict[str, torch.Tensor]:
    out = dict(parts.trunk)
    if parts.fc:
        (w6, b6), (w7, b7) = parts.fc
        s = POOL5_SIZE[parts.spec.arch]
        out.update({"fc6.weight": w6.reshape(w6.shape[0], -1, s, s), "fc6.bias": b6,
                    "fc7.weight": w7[:, :, None, None], "fc7.bias": b7})
    return {k: v.contiguous() for k, v in out.items()}


def torchvision_weights(model: TapNet) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("top_layer.")}


class _PortablePickler(pickle.Pickler):
    """Pickles arrays via the public ``numpy.ndarray`` constructor: NumPy 2's own array pickle
    names ``numpy._core``, which NumPy 1.x (common next to detectron2) cannot import."""

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            a = np.ascontiguousarray(obj)
            return np.ndarray, (a.shape, a.dtype.str, bytearray(a.data))
        return NotImplemented


def check_out(out: Path, src: Path, fmt: str) -> None:
    """One UserError for an output path that cannot or should not be written."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file path inside it, e.g. "
                        f"{out / ('model.pkl' if fmt == 'detectron2' else 'model.pth')}.")
    if not out.parent.is_dir():
        raise UserError(f"--out folder {out.parent} does not exist; create it first "
                        f"(mkdir -p {out.parent}) or choose another path.")
    if out.resolve() == src.resolve() or (out.exists() and src.exists()
                                           and os.path.samefile(out, src)):
        raise UserError(f"--out {out} is the input checkpoint; choose another file name.")
    if fmt == "detectron2" and out.suffix != ".pkl":
        raise UserError(f"--out {out}: detectron2 reads a file in this format only when its "
                        f"name ends in .pkl; use {out.with_suffix('.pkl')}.")


def export(ckpt: LoadedCheckpoint, fmt: str, out: str | Path) -> Written:
    """Write ``ckpt``'s network to ``out`` in format ``fmt`` (atomically)."""
    out, s = Path(out), ckpt.spec
    meta = {"arch": s.arch, "sobel": s.sobel, "fc_dim": s.fc_dim, "epoch": ckpt.epoch,
            "source": str(ckpt.path), "source_sha256": file_sha256(ckpt.path)}
    if fmt == "detectron2":
        weights = detectron2_weights(split(ckpt.model))
        payload = {"model": weights, "__author__": D2_AUTHOR, "matching_heuristics": False,
                   "dcbench": meta}
        with atomic_open(out) as f:
            _PortablePickler(f, protocol=4).dump(payload)
    elif fmt == "mmseg":
        weights = mmseg_weights(split(ckpt.model))
        atomic_torch_save({"state_dict": weights, "meta": meta}, out)
    elif fmt == "torchvision":
        weights = torchvision_weights(ckpt.model)
        atomic_torch_save(weights, out)
    else:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    return Written(out, fmt, len(weights), s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluations.export",
                                description="Export a checkpoint for detectron2, "
                                "mmsegmentation or torchvision (see the module docstring).")
    p.add_argument("--ckpt", required=True, help="checkpoint to export (ours or released)")
    p.add_argument("--to", required=True, choices=FORMATS, help="target framework")
    p.add_argument("--out", required=True, help="file to write (.pkl for detectron2)")
    p.add_argument("--arch", choices=ARCHS, default=None,
                   help="architecture, if the file does not say (default: inferred)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load checkpoints that hold Python objects beyond tensors "
                   "(torch.load weights_only=False: runs code from the file; only for files "
                   "you trust)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        src, out = Path(args.ckpt).expanduser(), Path(args.out).expanduser()
        check_out(out, src, args.to)
        ckpt = load_checkpoint(src, arch=args.arch, trust_pickle=args.trust_pickle)
        print(export(ckpt, args.to, out).line())
    except UserError as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
