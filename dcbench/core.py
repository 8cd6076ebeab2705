"""The shared core: what every package of the suite uses, in one small module.

* :class:`UserError` -- the one exception type for mistakes a user can make; command-line
  entry points print its message (no traceback) and exit 2.
* :func:`atomic_open` / :func:`atomic_write` / :func:`atomic_write_json` -- the one atomic
  file writer (temp file in the same folder, fsync, ``os.replace``). Files honour the umask.
* :func:`file_lock` -- a blocking lock shared by processes (and nodes) that fill one cache.
* :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` and the image transforms of the protocols.
* :func:`resolve_device`, :func:`derive_seed` (the one seed scheme), :func:`file_sha256`,
  :func:`check_finite_loss` (a diverging loss, reported the same way everywhere).

Torch and torchvision are imported inside the functions that need them: ``tables`` imports
this module and never imports torch.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TMP_SUFFIX = ".tmp"


class UserError(Exception):
    """A problem with the user's input: the message names what, where, and the fix."""


# --------------------------------------------------------------------------- files


def temp_name(path: Path) -> Path:
    """The temp file an atomic write of ``path`` uses: ``.<name>.<host>.<pid>.<random>.tmp``
    (the writer's host and pid let a later run tell a dead writer's leftovers)."""
    host = socket.gethostname().replace(".", "-")
    return path.parent / f".{path.name}.{host}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1, ...) would address process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path, older_than_s: float = 24 * 3600) -> list[Path]:
    """Remove the temp files of atomic writes in ``folder`` whose writer is gone: written by
    a dead process of this host, or older than ``older_than_s`` (another host's)."""
    removed = []
    host = socket.gethostname().replace(".", "-")
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        parts = p.name[: -len(TMP_SUFFIX)].rsplit(".", 3)  # .<name>, host, pid, random
        try:
            dead = (len(parts) == 4 and parts[1] == host and parts[2].isdigit()
                    and not pid_alive(int(parts[2])))
            if dead or time.time() - p.stat().st_mtime > older_than_s:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:
            continue
    if removed:
        log.info("removed %d temp file(s) left by interrupted writes in %s", len(removed), folder)
    return removed


@dataclass(frozen=True)
class Owner:
    """Who holds a lock or claim file: a process on a host, maybe a SLURM job."""

    pid: int
    host: str
    since: str
    job: str | None = None  # a SLURM job id when the work runs in a job

    def alive(self) -> bool | None:
        """True/False for a process of this host; None when it runs elsewhere (unknown)."""
        if self.host != socket.gethostname():
            return None
        return pid_alive(self.pid)

    def describe(self) -> str:
        job = f", SLURM job {self.job}" if self.job else ""
        return f"pid {self.pid} on {self.host}{job} since {self.since}"

    @classmethod
    def me(cls, job: str | None = None) -> "Owner":
        return cls(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%dT%H:%M:%S%z"), job)


def take(path: Path, job: str | None = None) -> Owner | None:
    """Create ``path`` exclusively with this process as its owner. Returns None when taken,
    else the current owner (an unreadable file -- its writer died mid-write -- reads as a
    dead owner of this host)."""
    me = Owner.me(job)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return read_owner(path)
    except OSError as e:
        if e.errno in WRITE_ERRORS:
            raise write_error(path, e) from None
        raise
    with os.fdopen(fd, "w") as f:
        json.dump(me.__dict__, f)
    return None


def read_owner(path: Path) -> Owner:
    try:
        return Owner(**json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError):
        return Owner(-1, socket.gethostname(), "unknown")


def update_owner(path: Path, owner: Owner) -> None:
    """Replace the owner recorded in ``path`` (a hand-over; atomic)."""
    atomic_write_json(path, owner.__dict__)


WRITE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


def write_error(path: Path, e: OSError) -> UserError:
    """One clear line for an output that cannot be written (full or read-only disk, ...)."""
    what = WRITE_ERRORS.get(e.errno, e.strerror or type(e).__name__)
    return UserError(f"cannot write {path}: {what}. Free space, fix the permissions or choose "
                     "another output folder; the previous version of the file, if any, is "
                     "intact.")


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if absent) for the ``with`` block;
    waits while another process holds it. The kernel drops it when its holder dies, so a
    killed job never leaves it held."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# a job scheduler's "time is up" / "checkpoint now" signals (submitit: USR2 checkpoints,
# requeues and exits; TERM); never SIGINT, which the user sends
SCHEDULER_SIGNALS = tuple(getattr(signal, n) for n in ("SIGUSR1", "SIGUSR2", "SIGTERM")
                          if hasattr(signal, n))


@contextmanager
def deferred_signals(signums: tuple[int, ...] = SCHEDULER_SIGNALS) -> Iterator[None]:
    """Hold back the Python handlers of ``signums`` while the block runs, then deliver each
    signal that came meanwhile, once. A handler that exits in the middle of ``torch.save``
    leaves the zip writer's own error ("unexpected pos"), which then stands for the job's
    result instead of its requeue. Main thread only (where Python runs handlers); elsewhere,
    and for signals whose handler Python did not install, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    mine = [s for s in signums if signal.getsignal(s) is not None]
    old = {s: signal.signal(s, lambda n, _frame: caught.append(n)) for s in mine}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file next to ``path`` for writing; on success fsync it and rename it over
    ``path``; on any error remove it. Readers see the old file or the new one, never a part.
    A scheduler's signal that arrives meanwhile is handled once the file is in place
    (:func:`deferred_signals`).

    The temp file is created with mode ``0o666`` filtered by the umask, like any file the
    user writes (``tempfile.mkstemp`` would force 0600).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    with deferred_signals():
        with _atomic_open(Path(path), mode) as f:
            yield f


@contextmanager
def _atomic_open(path: Path, mode: str) -> Iterator[IO]:
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        if e.errno in WRITE_ERRORS:
            raise write_error(path, e) from None
        raise
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8",
                                                            "newline": "\n"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
            raise write_error(path, e) from None
        raise


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; return the path."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    return atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------- images


def _normalize():
    from torchvision import transforms as T

    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def train_transform(size: int):
    """Pretraining: RandomResizedCrop (default scale/ratio) + horizontal flip + normalisation."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                      _normalize()])


def eval_transform(resize: int, size: int):
    """Feature extraction: Resize, CenterCrop, normalisation."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), _normalize()])


def probe_train_prefix(resize: int):
    """The deterministic part of :func:`probe_train_transform`: Resize, CenterCrop(resize),
    then ToTensor and normalisation -- per-pixel, so they commute with the crop and flip."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize), T.CenterCrop(resize), T.ToTensor(), _normalize()])


def probe_train_suffix(size: int):
    """The random part of :func:`probe_train_transform`, on the prefix's tensor: RandomCrop and
    flip draw from torch's RNG exactly as they do on a PIL image."""
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(size), T.RandomHorizontalFlip()])


def probe_train_transform(resize: int, size: int):
    """The authors' probe training crops: Resize, CenterCrop(resize), RandomCrop, flip,
    normalised -- as prefix then suffix, pixel for pixel what the authors' order gives."""
    from torchvision import transforms as T

    return T.Compose([probe_train_prefix(resize), probe_train_suffix(size)])


class _StackCrops:
    """Normalise each crop of a TenCrop and stack them (a class: picklable for workers)."""

    def __init__(self) -> None:
        from torchvision import transforms as T

        self.norm = T.Compose([T.ToTensor(), _normalize()])

    def __call__(self, crops):
        import torch

        return torch.stack([self.norm(c) for c in crops])


def probe_test_transform(resize: int, size: int):
    """Resize then TenCrop -> tensor [10, 3, size, size] (crop 4 is the centre crop)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize), T.TenCrop(size), _StackCrops()])


# --------------------------------------------------------------------------- runtime


def resolve_device(name: str):
    """``auto`` -> cuda if visible else cpu; ``cuda[:N]`` without a GPU is a UserError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name} was asked for but no CUDA GPU is visible; use cpu.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda[:N].") from None


def sgd(params, **kw):
    """``torch.optim.SGD`` with its fused kernel where this torch has one for the params'
    device (torch >= 2.4 on CPU): one pass over each tensor instead of three, ~1.7x faster
    steps on the memory-bound fc6; the same update up to float rounding (1 ulp)."""
    import torch

    params = list(params)
    try:
        return torch.optim.SGD(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this torch / device
        return torch.optim.SGD(params, **kw)


def _seed_part(p: int | str) -> int:
    if isinstance(p, str):
        return int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little")
    if p < 0:
        raise ValueError(f"seed parts must be >= 0, got {p}")
    return int(p)


def derive_seed(*parts: int | str) -> int:
    """The one seed scheme: an independent 63-bit seed for a tuple of ints and names
    (run seed, epoch, stream, head name, image index, ...), via numpy's SeedSequence."""
    words = [_seed_part(p) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


def check_number(where: str, name: str, value, *, minimum: float | None = None,
                 maximum: float | None = None, above: float | None = None,
                 below: float | None = None) -> None:
    """One UserError unless ``value`` is a finite real number within the given bounds
    (``minimum``/``maximum`` inclusive, ``above``/``below`` exclusive)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    ok = ok and (above is None or value > above) and (below is None or value < below)
    if not ok:
        bounds = [f">= {minimum:g}" if minimum is not None else "",
                  f"> {above:g}" if above is not None else "",
                  f"<= {maximum:g}" if maximum is not None else "",
                  f"< {below:g}" if below is not None else ""]
        rule = " and ".join(b for b in bounds if b)
        raise UserError(f"{where}: {name} must be a finite number{' ' + rule if rule else ''} "
                        f"(got {value!r}).")


def check_finite_loss(loss: float, where: str, fix: str) -> None:
    """Raise one UserError if a training loss is NaN or infinite: the run diverged."""
    if not math.isfinite(loss):
        raise UserError(f"the training loss became {loss} at {where}: the network diverged; "
                        f"{fix}.")


class SeededDraws:
    """A dataset whose item ``(draw, index)`` is ``dataset[index]`` computed with torch's RNG
    seeded by ``derive_seed(seed, epoch, draw)``: random augmentations then depend on the seed,
    the epoch and the draw's position in the epoch only -- not on the number of DataLoader
    workers, nor on which process makes the item. Use with :class:`EnumeratedSampler`."""

    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating a loader for ``epoch`` (workers get a copy at that point)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        import torch

        draw, index = key
        gen = torch.default_generator  # the CPU RNG the transforms draw from
        state = gen.get_state()
        gen.manual_seed(derive_seed(self.seed, self.epoch, draw))
        try:
            return self.dataset[index]
        finally:
            gen.set_state(state)


class EnumeratedSampler:
    """Yields ``(draw, index)`` for each index of ``sampler``, draw = 0, 1, ..."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        return iter(enumerate(self.sampler))

    def __len__(self) -> int:
        return len(self.sampler)
