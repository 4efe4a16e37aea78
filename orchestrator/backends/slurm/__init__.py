"""Everything SLURM: submission through submitit (:mod:`.submit`), following and merging an
attempt's records (:mod:`.backend`), the code that runs on each node (:mod:`.node`) and the
table of SLURM states (:mod:`.states`). What each node runs is planned in :mod:`orchestrator.plan.slurm`."""
from .backend import SlurmBackend

__all__ = ["SlurmBackend"]
