# r1flow: the DeepSeek-R1 pipeline (arXiv 2501.12948) as a Snakemake workflow.
# Default target: R1-Zero (section 2.2) end to end on the embedded tiny default:
#   tasks -> base model -> R1-Zero GRPO -> evaluation -> tables and plots.

import os

from snakemake.utils import min_version

min_version("9.0")


# The embedded default, found next to this Snakefile whatever the working directory; --configfile
# files given on the command line are merged over it.
configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/decontamination.smk"
include: "workflow/rules/base.smk"
include: "workflow/rules/zero.smk"
include: "workflow/rules/cold_start.smk"
include: "workflow/rules/reasoning_rl.smk"
include: "workflow/rules/rejection_sampling.smk"
include: "workflow/rules/rl_all.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/report.smk"


# Seconds-long jobs run on the submitting host rather than as cluster jobs (only matters under an executor).
localrules:
    all,
    tasks,
    decontamination,
    r1_zero_report,
    benchmark_table,
    stage_curves,


rule all:
    default_target: True
    input:
        rules.r1_zero_report.output,
        rules.benchmark_table.output,
        rules.stage_curves.output,
        rules.decontamination.output.table_csv,
        rules.decontamination.output.table_md,
