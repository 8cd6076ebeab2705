"""The one place that reads and writes checkpoints.

Formats read:
* ours: ``{'format': 'dcbench/1', 'epoch', 'arch', 'state_dict', 'optimizer', 'spec', ...}``
  with the released key layout;
* the authors' released files as published: ``{'epoch', 'arch', 'state_dict'}`` with keys
  ``features.module.N.*``, ``classifier.*``, ``top_layer.*`` (k x 4096), ``sobel.*``, no
  optimizer, written by PyTorch 0.3 under Python 2: the legacy (non-zip) serialization, byte
  strings in the pickle (read as latin-1) and no BatchNorm ``num_batches_tracked`` buffers
  (they appeared in PyTorch 0.4.1; a missing one is filled with 0, as PyTorch itself does).
  Sobel is detected from ``sobel.0.weight``, k from the rows of ``top_layer.bias``;
* a bare state dict (ours or a ``module.``-prefixed DataParallel one), and torchvision's
  ResNet-50 layout (``conv1.weight``, ``layer1.0...``, ``fc.*``).

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only. A file
that needs arbitrary Python objects is refused with one message; ``trust_pickle=True`` (the
CLIs' ``--trust-pickle``) reads it with ``weights_only=False``, which runs code stored in the
file: only for files whose origin you trust.

Written: ours, atomically (:func:`dcbench.core.atomic_open`), in the released key layout.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dcbench.core import UserError, atomic_open

from .models import ModelSpec, TapNet, build_model

FORMAT = "dcbench/1"
OPTIONAL_BUFFER = ".num_batches_tracked"  # absent from files of PyTorch < 0.4.1


class _WriteErrors:
    """A file wrapper that remembers the OSError a write raised: torch.save reports a full disk
    as a bare RuntimeError ("unexpected pos ...") once its writer notices."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through the one atomic writer (a full disk is one clear error)."""
    with atomic_open(path) as f:
        out = _WriteErrors(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
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
                                "AlexNet (5) nor VGG16 (13), so not a backbone this suite can "
                                "evaluate.")
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
    keys_used: int = 0  # state-dict entries of the file loaded into the model (all of them)
    filled: tuple[str, ...] = ()  # buffers the file predates, set to their default


TRUST_HINT = ("Pass --trust-pickle to load it anyway: that runs code stored in the file, so do "
              "it only for a file whose origin you trust (e.g. the authors' release, its "
              "sha256 checked), or re-save its tensors with a trusted PyTorch first.")


def _load(path: Path, weights_only: bool) -> Any:
    # Python 2 byte strings (the released files) come back as str: the safe loader decodes
    # them itself; the full unpickler is told latin-1, a no-op for Python 3 files
    if weights_only:
        return torch.load(path, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=False, encoding="latin1")


def read_checkpoint_file(path: str | Path, trust_pickle: bool = False) -> dict:
    """``torch.load`` a checkpoint with tensors and containers only (``weights_only``), with
    one clear error for a missing, truncated, foreign or object-holding file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}. Pass the path of a .pth file "
                        "(ours from `python -m pretrain`, or the authors' released one).")
    try:
        obj = _load(path, weights_only=True)
    except PermissionError:
        raise UserError(f"cannot read checkpoint {path}: permission denied. Fix its "
                        "permissions, or ask its owner for a readable copy.") from None
    except pickle.UnpicklingError as e:
        if "Unsupported" not in str(e):  # cut short or garbled, not a forbidden object
            raise _unreadable(path, e) from None
        if not trust_pickle:
            what = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), "")
            raise UserError(f"checkpoint {path} holds pickle content that the safe loader "
                            f"(torch.load weights_only=True) does not read ({what[:160]}): "
                            "Python objects other than tensors and plain containers, or old "
                            "opcodes such as Python 2's INT for 64-bit numbers. "
                            f"{TRUST_HINT}") from None
        try:
            obj = _load(path, weights_only=False)
        except Exception as e2:  # noqa: BLE001 -- an arbitrary pickle raises anything
            raise _unreadable(path, e2) from None
    except Exception as e:  # noqa: BLE001 -- arbitrary bytes make torch.load raise anything
        # (RuntimeError, EOFError, BadZipFile, IndexError on a text file, ...)
        raise _unreadable(path, e) from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict with a "
                        "'state_dict'.")
    return obj


def _unreadable(path: Path, e: BaseException) -> UserError:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return UserError(f"cannot read checkpoint {path}: it is truncated, corrupt or not a "
                     f"PyTorch checkpoint ({first[:200]}). Re-download or re-create it.")


def _state_dict_of(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    sd = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a model checkpoint: no 'state_dict' of tensors found "
                        f"(top-level keys: {list(obj)[:8]}).")
    return sd


def check_coverage(model: TapNet, sd: dict[str, torch.Tensor], path: Path) -> tuple[str, ...]:
    """Fail clearly on missing/unexpected keys or shape mismatches; return the optional
    buffers (``num_batches_tracked``) the file lacks. ``top_layer`` (the k-way head) may be
    absent; when present it must match like any other key."""
    want = model.state_dict()
    missing = sorted(k for k in set(want) - set(sd) if not k.startswith("top_layer."))
    optional = tuple(k for k in missing if k.endswith(OPTIONAL_BUFFER))
    missing = [k for k in missing if not k.endswith(OPTIONAL_BUFFER)]
    unexpected = sorted(set(sd) - set(want))
    bad_shape = sorted(k for k in set(want) & set(sd) if want[k].shape != sd[k].shape)
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing backbone keys (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"{len(bad_shape)} shape mismatches (e.g. {k}: checkpoint "
                         f"{tuple(sd[k].shape)} vs {model.spec.arch} {tuple(want[k].shape)})")
        raise UserError(f"checkpoint {path} does not match {model.spec.arch} "
                        f"(sobel={model.spec.sobel}, fc_dim={model.spec.fc_dim}): "
                        + "; ".join(parts) + ". Is the file a DeepCluster backbone of this "
                        "architecture (AlexNet or VGG16 with the released key names, or a "
                        "torchvision ResNet-50)?")
    return optional


def load_checkpoint(path: str | Path, arch: str | None = None,
                    trust_pickle: bool = False) -> LoadedCheckpoint:
    """Rebuild the network stored in ``path`` (ours, released, or a state dict)."""
    path = Path(path).expanduser()
    obj = read_checkpoint_file(path, trust_pickle)
    sd = normalise_keys(_state_dict_of(obj, path))
    declared = obj.get("arch")
    if isinstance(declared, str):
        declared = declared.lower().replace("_bn", "")
        if declared not in ("alexnet", "vgg16", "resnet50"):
            declared = None
    if arch is not None and declared is not None and arch != declared:
        raise UserError(f"architecture mismatch: {path} holds a {declared} but {arch} was "
                        "asked for. Pass the right checkpoint.")
    try:
        spec = infer_spec(sd, arch or declared)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    model = build_model(spec)
    filled = check_coverage(model, sd, path)
    model.load_state_dict({**sd, **{k: torch.tensor(0) for k in filled}}, strict=True)
    kind = "ours" if obj.get("format") == FORMAT else (
        "released" if "state_dict" in obj else "state_dict")
    epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
    return LoadedCheckpoint(model=model, spec=spec, path=path, kind=kind, epoch=epoch, raw=obj,
                            keys_used=len(sd), filled=filled)


def released_payload(model: TapNet, epoch: int) -> dict:
    """The authors' released format: ``{'epoch', 'arch', 'state_dict'}``, no optimizer."""
    return {"epoch": epoch, "arch": model.spec.arch,
            "state_dict": to_released_keys(model.state_dict())}
