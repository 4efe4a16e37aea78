"""What runs inside the training job, beside ``train_worker.py``, and the contract with the orchestrator.

:mod:`~orchestrator.worker.channel` (file names, formats, exit codes) and
:mod:`~orchestrator.worker.checkpoints` (the completion marker and the completeness test)
are the contract both sides import; the rest (the torchrun agent wrapper, CPU FSDP, the
varlen attention kernel, worker support) runs only in the job's processes. Nothing here
imports anything else of the orchestrator, so the job never depends on how it is supervised.
"""
