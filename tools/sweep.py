"""Train configs × grid values × seeds, N runs at a time, and print their summary table (docs/studies.md):

    python3 tools/sweep.py --cfg A.yaml [B.yaml ...] [--seeds 0 1 2] [--grid KEY=v1,v2 ...] [--jobs N]
                           [--devices 0,1] [--out output/sweep] [--dry-run] [--launcher local|slurm] [KEY VALUE ...]

Each run is `tools/train.py --cfg C --run-dir <out>/<config stem>/<KEY=value,... or base>/seed<s>` with the common
overrides, its grid values and EXPERIMENT.SEED s; its output goes to train.log in that directory. A rerun skips
finished runs (same config_sha), resumes interrupted ones from `latest` and refuses a directory holding another
config's run. The overrides start at the first all-caps KEY (or after `--`). Ctrl-C/SIGTERM stops every run at a
step boundary; rerun the same command to continue. Exit status: 0, 1 (a run failed), 2 (bad config or option),
128 + N (stopped by signal N).
"""
import argparse
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistiller.launch.cli import run_cli
from mdistiller.launch.sweep import split_overrides, sweep


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("sweep.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", nargs="+", required=True, help="experiment yaml files")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="EXPERIMENT.SEED values (default 0)")
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=v1,v2",
                        help="config keys and values to cross (commas inside [...] stay: KEY=[1,2],[3])")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once on this machine, the CPU cores shared out")
    parser.add_argument("--devices", default=None, help="GPU ids, e.g. 0,1: one run per GPU at a time (--jobs unused)")
    parser.add_argument("--out", default=os.path.join("output", "sweep"), help="folder of the run directories")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their states; run nothing")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local subprocesses, or Slurm jobs through submitit (pip install 'mdistiller[cluster]')")
    slurm = parser.add_argument_group("slurm launcher")
    slurm.add_argument("--slurm-partition", default=None)
    slurm.add_argument("--timeout-min", type=int, default=None, help="time limit of each job (requeued after it)")
    slurm.add_argument("--gpus-per-node", type=int, default=None)
    slurm.add_argument("--cpus-per-task", type=int, default=None)
    slurm.add_argument("--submitit-cluster", default=None, help=argparse.SUPPRESS)  # "local": tests without Slurm
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    options, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(options)
    slurm = {"slurm_partition": args.slurm_partition, "timeout_min": args.timeout_min,
             "gpus_per_node": args.gpus_per_node, "cpus_per_task": args.cpus_per_task}
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    status: Dict[str, int] = {}

    def body() -> None:
        status["code"] = sweep(args.cfg, args.seeds, args.grid, overrides, args.out, args.jobs, devices,
                               args.dry_run, args.launcher, slurm, args.submitit_cluster)

    return run_cli("sweep.py", body, args.debug) or status.get("code", 0)


if __name__ == "__main__":
    sys.exit(main())
