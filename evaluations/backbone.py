"""Checkpoint -> frozen backbone with named taps, plus its provenance for records."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from dcbench.core import UserError, file_sha256
from pretrain.checkpoint import atomic_torch_save, load_checkpoint, released_payload
from pretrain.models import ModelSpec, TapNet, build_model

from .context import TaskContext
from .records import CheckpointInfo


def describe_checkpoint(path: str | Path, label: str | None = None,
                        trust_pickle: bool = False) -> CheckpointInfo:
    """Read ``path`` once to fill in its :class:`CheckpointInfo` (validates the file too)."""
    path = Path(path).expanduser().resolve()
    loaded = load_checkpoint(path, trust_pickle=trust_pickle)
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


def load_cell_checkpoint(ctx: TaskContext) -> TapNet:
    """The network of the cell's checkpoint, after checking the file is the one the cell was
    keyed by (a file replaced between submission and run would give foreign numbers)."""
    ck = ctx.checkpoint
    if not Path(ck.path).is_file():
        raise UserError(f"checkpoint {ck.path} no longer exists (it was there when the job was "
                        "submitted); put it back, or rerun run_all with the new path.")
    if file_sha256(ck.path) != ck.sha256:
        raise UserError(f"checkpoint {ck.path} changed since the job was submitted (sha256 "
                        "differs); rerun run_all so the cell is keyed by the new file.")
    model = load_checkpoint(ck.path, trust_pickle=ctx.runtime.trust_pickle).model
    if ctx.runtime.channels_last:  # convolutions then run NHWC whatever the inputs' layout
        model = model.to(memory_format=torch.channels_last)
    return model


def frozen_backbone(ctx: TaskContext) -> TapNet:
    """The cell's network in eval mode on its device, every parameter frozen, no k-way head."""
    model = load_cell_checkpoint(ctx)
    model.top_layer = None
    model.eval().to(ctx.device)
    for p in model.parameters():
        p.requires_grad = False
    return model
