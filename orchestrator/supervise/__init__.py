"""Owning a job: the supervisor loop, how an attempt's end is classified, the retry policy,
the watchdog, and the verbs that act on a job (supervise, cancel, resume)."""
