"""What a task gets besides its recipe: the runtime settings and the cell's context.

A task's config dataclass is its *recipe*: every setting that can change a number, hashed into
the cell key. :class:`Runtime` holds the settings that cannot change a number (how many data
workers, which device, cache sizes): recorded in each record's ``env.runtime``, never hashed,
so changing them never reruns a cell. Random augmentations are seeded per draw
(:class:`dcbench.core.SeededDraws`), so the number of workers does not change the crops.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dcbench.core import UserError

from .records import CheckpointInfo


@dataclass(frozen=True)
class Runtime:
    """How a cell runs (never part of its key)."""

    workers: int = 8  # DataLoader worker processes
    device: str = "auto"  # auto | cpu | cuda[:N]
    # in-memory caches, each up to this size: frozen val features; decoded train images (no workers)
    val_cache_gb: float = 2.0
    trust_pickle: bool = False  # load checkpoints that need weights_only=False
    save_every: int = 1000  # iterations between a long task's saves of its training state
    # NHWC weights: faster convolutions (oneDNN CPUs, tensor-core GPUs); the same numbers up
    # to float rounding, like a change of device
    channels_last: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 0:
            raise UserError(f"runtime: workers must be an integer >= 0 (got {self.workers!r}).")
        if not isinstance(self.save_every, int) or self.save_every < 1:
            raise UserError(f"runtime: save_every must be an integer >= 1 (got {self.save_every!r}).")
        if not isinstance(self.val_cache_gb, (int, float)) or self.val_cache_gb < 0:
            raise UserError(f"runtime: val_cache_gb must be >= 0 (got {self.val_cache_gb!r}).")
        if not isinstance(self.channels_last, bool):
            raise UserError(f"runtime: channels_last must be true or false (got "
                            f"{self.channels_last!r}).")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise UserError(f"runtime: device must be auto, cpu or cuda[:N] (got {self.device!r}).")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str) -> "Runtime":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{where}: unknown runtime setting(s) {unknown}; known: "
                            f"{', '.join(sorted(known))}.")
        return cls(**values)


@dataclass(frozen=True)
class TaskContext:
    """Everything a task's ``run(config, ctx)`` reads besides its recipe."""

    checkpoint: CheckpointInfo
    dataset: str  # the dataset role
    data_root: Path
    seed: int
    runtime: Runtime
    device: Any  # torch.device, resolved from runtime.device
    state_dir: Path  # where a long task may keep its own training state (resume)
    extra_roots: dict[str, Path] = field(default_factory=dict)  # other roles it reads (sbd)
    cache_dir: Path | None = None  # results shared by the checkpoint's cells (descriptors)

    @property
    def shared_cache(self) -> Path:
        """Where cells of one checkpoint share derived data (default: next to the state)."""
        return self.cache_dir if self.cache_dir is not None else self.state_dir.parent / "cache"

    def clear_state(self) -> None:
        """Remove the cell's own training state once its numbers are computed."""
        shutil.rmtree(self.state_dir, ignore_errors=True)
