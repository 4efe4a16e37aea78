"""The ``orchestrate`` command line: verbs, arguments and their help."""
from __future__ import annotations

import argparse

SUBMIT_HELP = """\
Validate CONFIG, plan the launch and run it under a supervisor.

In the foreground the live status of the job is shown until it ends; Ctrl-C
CANCELS the job (every process of it is ended), as the top line of the view says.
Use --detach to hand the job to a background supervisor that survives the
terminal: it prints only the job id; watch it with `orchestrate status JOB` or
`orchestrate logs JOB -f` (Ctrl-C there only leaves the view).
Exit status: 0 completed, 1 failed, 2 bad config or usage, 130 cancelled.

KEY=VALUE after CONFIG sets a key of the config for this job (learning_rate=1e-5,
launch.nproc_per_node=1, fsdp_config.cpu_offload=true); values are read as YAML.
--sweep KEY=V1,V2 (repeatable: every combination) submits one job per point, each
with its own output_dir (<output_dir>/lr-1e-5), as one group: on this machine the
jobs wait QUEUED for free GPUs (or CPU cores) and start as earlier ones end."""

STATUS_HELP = """\
Without JOB: every job in the ledger (state, attempt n/budget, progress, loss and
its trend, tokens/s, ETA, last verified checkpoint, elapsed time). With JOB: that
job in detail (loss curve, attempts and why each ended, first error, where the logs
are). On a terminal the view refreshes until Ctrl-C, which only leaves the view:
the jobs keep running. Without a terminal, or with --once, one frame is printed
as plain text. "att 2/4": attempt 2 of at most 4 (1 + launch.retry.max_restarts;
graceful stops such as preemption are not counted against it)."""

LOGS_HELP = """\
Every rank's stdout and stderr with a [rank R] prefix (like tail; -f follows).
A failed attempt ends with its first error (the rank it came from) and where its
traceback is; --errors prints just that."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orchestrate", description="Launch, follow and resume LLM fine-tuning jobs.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    s = sub.add_parser("submit", help="validate, plan and run a training config",
                       description=SUBMIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("config")
    _add_overrides(s)
    s.add_argument("--dry-run", action="store_true", help="print the plan (command, env, paths) and start nothing")
    s.add_argument("--detach", action="store_true", help="supervise in the background; print only the job id "
                   "(with --sweep: each job's id on its own line)")
    s.add_argument("--max-parallel", type=int, metavar="N", help="with --sweep: run at most N jobs of the group at "
                   "once on this machine (default: what its GPUs, or CPU cores, hold side by side)")
    s.add_argument("--backend", choices=["local", "slurm"], help="override launch.backend of the config")
    s.add_argument("--gpus", type=int, metavar="N", help="with --dry-run: plan as on a machine with N GPUs "
                   "(e.g. a cluster node, from a laptop or a login node without GPUs)")
    s.add_argument("--gpu-memory", type=float, metavar="GIB", help="with --gpus: memory of each GPU in GiB "
                   "(for the memory estimate and its choices; default: unknown)")
    s.add_argument("--script", metavar="TRAIN.PY", help="run your own training script instead of train_worker.py "
                   "(launch.script): any script that builds a transformers/TRL Trainer and calls train() is "
                   "supervised without edits (progress, graceful stop, verified checkpoints, resume)")

    v = sub.add_parser("validate", help="check a config and report every problem; start nothing",
                       description="Check CONFIG as submit would (keys, types, paths, FSDP, report_to, the plan) "
                       "and report every problem at once. Exit status 0 valid, 2 invalid; nothing is started "
                       "or written.")
    v.add_argument("config")
    _add_overrides(v)
    v.add_argument("--script", metavar="TRAIN.PY", help="validate for your own training script (launch.script)")

    ls = sub.add_parser("list", help="jobs in the ledger, newest first",
                        description="One line per job (id, name, state, attempts, step, when): read from this "
                        "host's index of the run directories, fast for any number of jobs.")
    ls.add_argument("--state", action="append", help="only jobs in this state (repeatable; RUNNING, FAILED, ...)")
    ls.add_argument("--json", action="store_true", help="every job's ledger record as JSON")
    ls.add_argument("--group", metavar="G", help="only the jobs of sweep group G (an id or a unique prefix)")

    st = sub.add_parser("status", help="live view of all jobs, or of one job in detail",
                        description=STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("job", nargs="?")
    st.add_argument("--group", metavar="G", help="a sweep's jobs as one table: each point's keys, state, step, last "
                    "and best eval loss, best first (--json: the same as data)")
    st.add_argument("--once", action="store_true", help="print one frame and exit (the default without a terminal)")
    st.add_argument("--json", action="store_true", help="machine-readable output (one frame)")
    st.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between frames (default 1)")

    c = sub.add_parser("cancel", help="end a job and every process of it",
                       description="Ask the job's supervisor to end it (or act directly if none is alive, or "
                       "scancel a SLURM job still waiting in the queue), then check that no process of the job "
                       "is left. Checkpoints stay; `orchestrate resume JOB` continues a cancelled job.")
    c.add_argument("job", nargs="?")
    c.add_argument("--group", metavar="G", help="cancel every job of sweep group G that has not ended (queued "
                   "ones first, so that none starts)")

    ck = sub.add_parser("checkpoint", help="save a running job's checkpoint now; print its path when complete",
                        description="Ask a running job to save a checkpoint at its next step boundary (every "
                        "rank agrees), wait until every rank's part is written and the checkpoint is marked "
                        "complete, then print its path. Exit status 1 if the save fails, the job ends first "
                        "or --timeout passes.")
    ck.add_argument("job")
    ck.add_argument("--timeout", type=float, default=900.0, metavar="S", help="seconds to wait (default 900)")

    ex = sub.add_parser("export", help="write a checkpoint as a Hugging Face model folder (verified)",
                        description="Write the weights of a complete checkpoint of JOB (sharded or full) to --out "
                        "as a Hugging Face folder (config, safetensors, tokenizer, generation config), then load "
                        "it with AutoModelForCausalLM.from_pretrained and check its logits against the "
                        "checkpoint's. --out must not exist or be empty.")
    ex.add_argument("job")
    ex.add_argument("--step", type=int, metavar="N", help="checkpoint-N (default: the newest complete one)")
    ex.add_argument("--out", required=True, metavar="DIR")

    r = sub.add_parser("resume", help="take over a job whose supervisor is gone, or rerun a failed one",
                       description="Adopt a job whose supervisor died (its running attempt is followed again, "
                       "not restarted), or run a FAILED or CANCELLED job again from its newest complete "
                       "checkpoint with a fresh retry budget. Two resumes at once: one takes the job, the "
                       "other says who has it. The job's frozen plan is used, never an edited config file.")
    r.add_argument("job")
    r.add_argument("--detach", action="store_true", help="supervise in the background; print only the job id")
    r.add_argument("--nproc-per-node", type=int, metavar="M", help="resume an ended job on M processes per node, "
                   "keeping the global batch (gradient accumulation, and the micro-batch if needed, recomputed)")
    r.add_argument("--nodes", type=int, metavar="K", help="resume an ended SLURM job on K nodes (global batch kept)")

    lg = sub.add_parser("logs", help="print or follow a job's rank logs; find the first error",
                        description=LOGS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    lg.add_argument("job")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the attempt "
                    "(--attempt) or the job ends")
    lg.add_argument("--attempt", type=int, help="attempt number (default: the last)")
    lg.add_argument("--rank", type=int, help="only this rank")
    lg.add_argument("-n", "--lines", type=int, metavar="N", help="only the last N lines of each file "
                    "(default: all; 10 with -f)")
    lg.add_argument("--errors", action="store_true", help="only the first error of the (last failed) attempt "
                    "and its traceback")

    rp = sub.add_parser("report", help="write a PNG of loss and tokens/s over steps (needs matplotlib)",
                        description="Loss and tokens/s over steps, one colour per attempt, with the steps where "
                        "an attempt resumed and the checkpoints marked. Written to the job's run directory "
                        "(report.png) unless --out says where; prints the path.")
    rp.add_argument("job")
    rp.add_argument("--out", help="PNG file to write (default: <run dir>/report.png)")

    d = sub.add_parser("demo", help="build the tiny local demo model and data set",
                       description="Write a tiny random Llama, a tokenizer trained locally and a small chat data "
                       "set into --dir (no network), for configs/demo.yaml. Kept and reused if present.")
    d.add_argument("action", choices=["prepare"])
    d.add_argument("--dir", default=".demo", help="where to write them (default: .demo)")
    d.add_argument("--force", action="store_true", help="rebuild the assets even if --dir already has them")
    return p


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="set a key of the config for this job; "
                   "dotted keys reach sections (launch.nproc_per_node=1); values are read as YAML")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...", help="one job per value (repeat for "
                   "a grid of every combination), submitted as one group")
