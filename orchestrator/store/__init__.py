"""State on disk: the ledger of jobs and attempts, the run-directory layout, and readers of what
the worker writes there (progress records, rank logs, error records)."""
