"""Time the default target from a clean results folder: wall time, peak memory, the results table.

    python benchmarks/bench_default.py [--workdir DIR] [--config config/config.yaml] [--seed-offset N]
        [--target all] [--link models/smollm2 ...]

--target runs another target (r1_zero_report for a config that stops at R1-Zero); --link makes paths of
this checkout (a downloaded model) visible in the workdir, where the config's relative paths point.

--seed-offset shifts every seed of the config (tasks, corpora, models, every RL and SFT stage, sampling,
reward models, evaluation; the schema's defaults included) to check that the result holds on another seed. Prints the wall time, the peak RSS of the largest job, each job's time and memory (from
Snakemake's benchmark files) and the table.
"""

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # r1flow, when not pip-installed
from r1flow.config import validate_config  # noqa: E402
from r1flow.provenance import describe_machine  # noqa: E402


def shift_seeds(node, offset: int):
    """A copy of a config tree with `offset` added to every integer under a key named `seed`."""
    if isinstance(node, dict):
        return {k: (v + offset if k == "seed" and isinstance(v, int) else shift_seeds(v, offset))
                for k, v in node.items()}
    if isinstance(node, list):
        return [shift_seeds(v, offset) for v in node]
    return node


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    ap.add_argument("--seed-offset", type=int, default=0)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--target", default="all")
    ap.add_argument("--link", nargs="*", default=[], help="paths, relative to this checkout, to link into the workdir")
    a = ap.parse_args()
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="r1flow-bench-"))
    wd.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(Path(a.config).read_text())
    default = ROOT / "config" / "config.yaml"
    if Path(a.config).resolve() != default.resolve():
        # as Snakemake does with --configfile: the file is merged over the default, so a config that sets
        # a few keys (config/smoke.yaml) keeps the default's other values when its seeds are shifted
        from snakemake.utils import update_config

        merged = yaml.safe_load(default.read_text())
        update_config(merged, cfg)
        cfg = merged
    if a.seed_offset:
        # the whole default shifted: every `seed` of the config tree, the schema's defaults included
        cfg = shift_seeds(validate_config(cfg, ROOT / "workflow" / "schemas" / "config.schema.yaml"), a.seed_offset)
    conf = wd / "bench_config.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    res = wd / cfg.get("results", "results")
    if res.exists():
        raise SystemExit(f"{res} exists; the benchmark starts from a clean results folder")
    for rel in a.link:
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        if not (wd / rel).exists():
            (wd / rel).symlink_to((ROOT / rel).resolve())
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(wd),
           "--configfile", str(conf), "--cores", str(a.cores), a.target, "--quiet"]  # --quiet takes optional words
    t0 = time.time()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.time() - t0
    if p.returncode:
        print(p.stderr[-4000:])
        raise SystemExit(f"snakemake failed with {p.returncode}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"workdir: {wd}")
    print(f"machine: {describe_machine()}")
    print(f"wall time, snakemake --cores {a.cores} from clean results/: {wall:.1f} s")
    print(f"peak RSS of the largest process: {peak_mb:.0f} MB")
    rows = []
    for tsv in sorted((res / "benchmarks").glob("*.tsv")):
        b = pd.read_csv(tsv, sep="\t")
        rows.append({"job": tsv.stem, "s": b["s"].iloc[0], "max_rss_MB": b["max_rss"].iloc[0]})
    print(pd.DataFrame(rows).to_string(index=False))
    print((res / "tables" / "r1_zero.md").read_text())
    curve = pd.read_csv(res / "r1_zero" / "validation_curve.csv")
    print("validation curve:\n" + curve.to_string(index=False))
    m = pd.read_csv(res / "r1_zero" / "metrics.csv")
    q = m.groupby(pd.qcut(m["step"], 4, labels=False))
    print("mean completion length by quarter of training:", [round(x, 1) for x in q["completion_length"].mean()])
    if "reflections" in m:
        print("re-checks (wait) per completion by quarter of training:", [round(x, 3) for x in q["reflections"].mean()])


if __name__ == "__main__":
    main()
