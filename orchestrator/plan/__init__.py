"""Planning: (validated config, what the machine offers, the model's shape) -> a frozen :class:`LaunchPlan`.

Pure, except :mod:`orchestrator.plan.inputs` (the small loaders that read the outside world)
and :func:`prepare`, which calls them and then plans.
"""
from .launch_plan import AGENT_MODULE, LaunchPlan
from .make import choose_nproc, fsdp_env, make_plan
from .topology import Topology

__all__ = ["AGENT_MODULE", "LaunchPlan", "Topology", "choose_nproc", "fsdp_env", "make_plan"]
