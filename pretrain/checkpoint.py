"""The one place that reads and writes checkpoints.

Formats read:
* ours: ``{'format': 'dcbench/1', 'epoch', 'arch', 'state_dict', 'optimizer', 'spec', ...}``
  with the released key layout;
* the authors' released files: ``{'epoch', 'arch', 'state_dict'}`` with keys
  ``features.module.N.*``, ``classifier.*``, ``top_layer.*`` (k x 4096), ``sobel.*`` and no
  optimizer — Sobel is detected from ``sobel.0.weight``, k from the rows of ``top_layer.bias``;
* a bare state dict (ours or a ``module.``-prefixed DataParallel one), and torchvision's
  ResNet-50 layout (``conv1.weight``, ``layer1.0...``, ``fc.*``).

Written: ours, atomically (temp file + ``os.replace``), in the released key layout.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .models import ModelSpec, TapNet, build_model

FORMAT = "dcbench/1"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_released_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``features.N.*`` -> ``features.module.N.*`` (only ``features`` was DataParallel)."""
    return {("features.module." + k[len("features."):] if k.startswith("features.") else k): v
            for k, v in state_dict.items()}


_TV_RESNET = (("conv1.", "stem.0."), ("bn1.", "stem.1."))  # torchvision ResNet stem


def normalise_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Strip DataParallel ``module.`` prefixes and map torchvision ResNet stem names to ours."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module."):]
        k = k.replace("features.module.", "features.")
        for old, new in _TV_RESNET:
            if k.startswith(old):
                k = new + k[len(old):]
        # torchvision classifier heads (ResNet fc, VGG classifier.6): not part of the backbone
        for head in ("fc.", "classifier.6."):
            if k.startswith(head):
                k = "top_layer." + k[len(head):]
        out[k] = v
    return out


def infer_spec(sd: dict[str, torch.Tensor], arch: str | None = None) -> ModelSpec:
    """Architecture, Sobel, fc width and k from the (normalised) keys and shapes."""
    sobel = "sobel.0.weight" in sd
    if arch is None:
        if any(k.startswith("layer4.") for k in sd):
            arch = "resnet50"
        elif "features.0.weight" in sd:
            n_convs = sum(1 for k, v in sd.items()
                          if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4)
            arch = {5: "alexnet", 13: "vgg16"}.get(n_convs)
            if arch is None:
                raise UserError(f"checkpoint has {n_convs} conv layers in 'features': neither "
                                "AlexNet (5) nor VGG16 (13). Pass --arch or convert it first.")
        else:
            raise UserError("checkpoint keys match no supported architecture (expected "
                            "'features.*' for AlexNet/VGG16 or 'layer1..4.*' for ResNet-50); "
                            f"first keys: {list(sd)[:5]}")
    fc_dim = 2048
    if arch in ("alexnet", "vgg16"):
        fc7 = "classifier.4.weight" if arch == "alexnet" else "classifier.3.weight"
        fc_dim = sd[fc7].shape[0] if fc7 in sd else 4096
    k = sd["top_layer.bias"].shape[0] if "top_layer.bias" in sd else None
    return ModelSpec(arch=arch, sobel=sobel, fc_dim=int(fc_dim), k=k)


@dataclass
class LoadedCheckpoint:
    """A network rebuilt from a checkpoint file, with where it came from."""

    model: TapNet
    spec: ModelSpec
    path: Path
    kind: str  # ours | released | state_dict
    epoch: int | None
    raw: dict = field(repr=False)


def read_checkpoint_file(path: str | Path) -> dict:
    """``torch.load`` with one clear error for a missing, truncated or foreign file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}. Pass the path of a .pth file "
                        "(ours from `python -m pretrain`, or the authors' released one).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- arbitrary bytes make torch.load raise anything
        # (RuntimeError, EOFError, UnpicklingError, BadZipFile, IndexError on a text file, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path}: it is truncated, corrupt or not a "
                        f"PyTorch checkpoint ({first[:200]}). Re-download or re-create it.") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict with a "
                        "'state_dict'.")
    return obj


def _state_dict_of(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    sd = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a model checkpoint: no 'state_dict' of tensors found "
                        f"(top-level keys: {list(obj)[:8]}).")
    return sd


def check_coverage(model: TapNet, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Fail clearly on missing/unexpected backbone keys or shape mismatches (top_layer excluded)."""
    want = {k: v for k, v in model.state_dict().items() if not k.startswith("top_layer.")}
    have = {k: v for k, v in sd.items() if not k.startswith("top_layer.")}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    bad_shape = sorted(k for k in set(want) & set(have) if want[k].shape != have[k].shape)
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing backbone keys (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"{len(bad_shape)} shape mismatches (e.g. {k}: checkpoint "
                         f"{tuple(have[k].shape)} vs {model.spec.arch} {tuple(want[k].shape)})")
        raise UserError(f"checkpoint {path} does not match {model.spec.arch} "
                        f"(sobel={model.spec.sobel}): " + "; ".join(parts) +
                        ". Check --arch, or that the file is a backbone of this architecture.")


def load_checkpoint(path: str | Path, arch: str | None = None) -> LoadedCheckpoint:
    """Rebuild the network stored in ``path`` (ours, released, or a state dict)."""
    path = Path(path).expanduser()
    obj = read_checkpoint_file(path)
    sd = normalise_keys(_state_dict_of(obj, path))
    declared = obj.get("arch")
    if isinstance(declared, str):
        declared = declared.lower().replace("_bn", "")
        if declared not in ("alexnet", "vgg16", "resnet50"):
            declared = None
    if arch is not None and declared is not None and arch != declared:
        raise UserError(f"architecture mismatch: {path} holds a {declared} but --arch {arch} "
                        "was given. Drop --arch or pass the right checkpoint.")
    try:
        spec = infer_spec(sd, arch or declared)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    model = build_model(spec)
    check_coverage(model, sd, path)
    model.load_state_dict(sd)
    kind = "ours" if obj.get("format") == FORMAT else (
        "released" if "state_dict" in obj else "state_dict")
    epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
    return LoadedCheckpoint(model=model, spec=spec, path=path, kind=kind, epoch=epoch, raw=obj)


def released_payload(model: TapNet, epoch: int) -> dict:
    """The authors' released format: ``{'epoch', 'arch', 'state_dict'}``, no optimizer."""
    return {"epoch": epoch, "arch": model.spec.arch,
            "state_dict": to_released_keys(model.state_dict())}
