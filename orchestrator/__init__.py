"""orchestrate: launch, follow and resume LLM fine-tuning jobs on torchrun and SLURM.

Importing the package is cheap on purpose: torch, transformers and trl are only
imported by the modules that need them (validation, the worker), never by the CLI
entry point, so ``orchestrate --help`` and ``orchestrate status`` stay fast.
"""

__version__ = "0.1.0"
