"""Who computes which cell: ``<results>/<ckpt-id>/<cell-key>.claim`` (pid, host, SLURM job).

run_all claims a cell before submitting it; the job that runs it re-claims it as its own
(its pid, its SLURM job id) when it starts and releases it when it has written its record or
failure. So a second run_all on the same results folder -- now, or after the first was killed
while its SLURM arrays live on -- neither recomputes nor waits blindly for such cells: it skips
cells whose claim is held by a live process of this host or a queued/running SLURM job, and
takes over claims whose holder is gone.
"""
from __future__ import annotations

import logging
from pathlib import Path

from dcbench.core import Owner, read_owner, take, update_owner

log = logging.getLogger(__name__)
SUFFIX = ".claim"


def claim_path(results: Path, ckpt_id: str, cell_key: str) -> Path:
    return Path(results) / ckpt_id / f"{cell_key}{SUFFIX}"


def holder_alive(path: Path) -> tuple[bool | None, str]:
    """(alive?, who) of a claim: True/False when it can be told, None for another host's
    process that no SLURM job vouches for."""
    from slurm.launch import active_slurm_jobs

    owner = read_owner(path)
    if owner.job:
        active = active_slurm_jobs([owner.job])
        if active is not None:
            return bool(active), owner.describe()
    return owner.alive(), owner.describe()


def claim(path: Path) -> str | None:
    """Claim a cell for this process: None when claimed, else why it is someone else's."""
    if take(path) is None:
        return None
    alive, who = holder_alive(path)
    if alive is False:
        log.info("taking over the claim %s of %s (no longer running)", path.name, who)
        path.unlink(missing_ok=True)
        return None if take(path) is None else f"claimed meanwhile by {read_owner(path).describe()}"
    if alive is None:
        return f"claimed by {who} (another host: if that run is gone, delete {path})"
    return f"being computed by {who}"


def hand_over(path: Path, job: str | None = None) -> None:
    """The job now running the cell takes the claim (its pid; its SLURM job id if any)."""
    update_owner(path, Owner.me(job))


def set_job(path: Path, job: str) -> None:
    """Record the SLURM job a submitted cell was given (until the job takes the claim)."""
    if path.exists():
        owner = read_owner(path)
        if owner.job is None:
            update_owner(path, Owner(owner.pid, owner.host, owner.since, job))


def release(path: Path) -> None:
    path.unlink(missing_ok=True)
