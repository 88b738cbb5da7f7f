"""Runs a rule's command and, if it succeeds, writes the job's provenance record (r1flow.provenance).

    provenance.py --record R --rule NAME [--settings JSON ...] [--inputs F ...] [--outputs F ...] [--tracking JSON]
                  -- CMD ...

Every rule's shell goes through this, so each job of the DAG leaves one record whatever runs it
(local, SLURM, torchrun).
"""

import argparse
import json
import sys
from pathlib import Path

import _common  # noqa: F401  (puts r1flow on the path when it is not pip-installed)

from r1flow.provenance import run_and_record


def setting(text: str):
    """A JSON setting (the config subtrees rules pass) or, failing that, a plain string (a model path)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("provenance.py: expected '-- COMMAND ...' after the options")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--record", required=True, help="the JSON record to write")
    ap.add_argument("--rule", required=True, help="the job's name (rule and wildcards)")
    ap.add_argument("--settings", type=setting, nargs="*", default=[], help="resolved settings passed to the script")
    ap.add_argument("--inputs", nargs="*", default=[])
    ap.add_argument("--outputs", nargs="*", default=[])
    ap.add_argument("--tracking", type=setting, default=None,
                    help="the job's tracking settings (config `tracking`): its run, named in the record")
    a = ap.parse_args(argv[:cut])
    command = argv[cut + 1 :]
    if not command:
        sys.exit("provenance.py: no command after '--'")
    sys.exit(run_and_record(command, a.record, rule=a.rule, settings=a.settings, inputs=a.inputs, outputs=a.outputs,
                            tracking=a.tracking,
                            repo=Path(__file__).resolve().parent.parent))  # the workflow's checkout


if __name__ == "__main__":
    main()
