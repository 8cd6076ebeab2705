"""Cluster side of the suite: submitit executors and job arrays (:mod:`slurm.launch`) and a
real single-node SLURM for tests and trying the suite (:mod:`slurm.local_cluster`)."""
