"""Exit statuses and small output helpers shared by the verbs."""
from __future__ import annotations

import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130


def print_notices(notices) -> None:
    """One ``notice:`` line on stderr per notice."""
    for n in notices:
        print(f"notice: {n}", file=sys.stderr)
