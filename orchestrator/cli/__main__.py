"""``python -m orchestrator.cli``: the same as the ``orchestrate`` command."""
import sys

from . import main

sys.exit(main())
