"""Checkpoint -> frozen backbone with named taps, plus its provenance for records."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pretrain.checkpoint import atomic_torch_save, load_checkpoint, released_payload
from pretrain.models import ModelSpec, TapNet, build_model


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class CheckpointInfo:
    """What a record says about the checkpoint it evaluated."""

    id: str  # <stem>-<sha256[:10]>: the results sub-folder
    label: str  # row label in the tables
    path: str
    sha256: str
    arch: str
    sobel: bool
    fc_dim: int
    epoch: int | None
    k: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def describe_checkpoint(path: str | Path, label: str | None = None) -> CheckpointInfo:
    """Read ``path`` once to fill in its :class:`CheckpointInfo` (validates the file too)."""
    path = Path(path).expanduser().resolve()
    loaded = load_checkpoint(path)
    sha = file_sha256(path)
    k = loaded.raw.get("k") if isinstance(loaded.raw.get("k"), int) else loaded.spec.k
    return CheckpointInfo(id=f"{path.stem}-{sha[:10]}", label=label or path.stem, path=str(path),
                          sha256=sha, arch=loaded.spec.arch, sobel=loaded.spec.sobel,
                          fc_dim=loaded.spec.fc_dim, epoch=loaded.epoch, k=k)


def write_random_checkpoint(spec: ModelSpec, path: str | Path, seed: int = 0) -> Path:
    """A never-trained network of ``spec`` (the paper's init), in the released format.

    This is the tables' "Random" row: same architecture and init, evaluated by the same
    protocol as the trained checkpoint.
    """
    path = Path(path)
    if not path.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(ModelSpec(spec.arch, spec.sobel, spec.fc_dim, None))
        atomic_torch_save(released_payload(model, epoch=0), path)
    return path


def state_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (BN running stats included), bit-exact."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def frozen_backbone(path: str | Path, device: torch.device) -> TapNet:
    """The network of ``path`` in eval mode with every parameter frozen."""
    model = load_checkpoint(path).model
    model.top_layer = None
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad = False
    return model
