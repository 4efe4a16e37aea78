"""What the user sees: the live status views, pure renders of snapshots (jobs table, job detail,
the plan's description), charts, log printing and the PNG report. Reads; never acts on a job."""
