"""Everything SLURM. A job is one allocation whose batch step runs the supervisor; each attempt is a job
step of it. Submission through submitit (:mod:`.submit`, :mod:`.allocation`), the attempts as steps
(:mod:`.steps`), the code each node of a step runs (:mod:`.node`), the merge of the nodes' records
(:mod:`.records`), what SLURM says of jobs and nodes (:mod:`.queue`, :mod:`.scontrol`) and the table of
SLURM states (:mod:`.states`). What the allocation and each node run is planned in
:mod:`orchestrator.plan.slurm`."""
