"""One row per experiment from the results.json of the runs below the folders (docs/studies.md):

    python3 tools/summarize.py output/sweep [DIR ...] [--format md|csv|json] [--group-by KEY ...] [--metric both]

Runs that differ only in EXPERIMENT.SEED form a group: best and last top-1 as mean ± sample std over its finished
runs, n, the seeds and the mean wall time. Unfinished runs and groups with fewer finished seeds than the largest
are flagged, never averaged in. Runs with an explain.json (tools/explain_eval.py runs) add their explanation
agreement and perturbation AUC; --baseline KEY=VALUE adds the paired difference to a baseline, seed by seed.
A folder without any results.json is a one-line error (exit status 2).
"""
import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistiller.launch.cli import run_cli
from mdistiller.launch.summary import FORMATS, GROUP_KEYS, METRIC_CHOICES, summary_text


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser("summarize.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="folders searched recursively for results.json")
    parser.add_argument("--format", choices=FORMATS, default="md", help="markdown table (default), csv or json")
    parser.add_argument("--group-by", nargs="+", default=list(GROUP_KEYS), metavar="KEY",
                        help="results.json fields (dataset, distiller, ...) or config keys with a dot (KD.TEMPERATURE,"
                             " read from the run's config.yaml); default: " + " ".join(GROUP_KEYS))
    parser.add_argument("--metric", choices=sorted(METRIC_CHOICES), default="both", help="accuracy columns to show")
    parser.add_argument("--baseline", default=None, metavar="KEY=VALUE",
                        help="add each group's paired difference to the group with KEY VALUE (e.g. distiller=KD) "
                             "that shares its other keys: per seed, mean ± std and wins")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    args = parser.parse_args(argv)
    return run_cli("summarize.py", lambda: sys.stdout.write(
        summary_text(args.folders, args.format, args.group_by, args.metric, args.baseline)), args.debug)


if __name__ == "__main__":
    sys.exit(main())
