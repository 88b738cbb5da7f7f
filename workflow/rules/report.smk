# Tables like the paper's and the miniature Figures 2 and 3.

# The validation curves of the RL stages and the loss curves of the SFT stages, by stage (sections 2.2-2.4).
RL_CURVES = {"r1_zero": rules.r1_zero.output.validation_curve, "reasoning_rl": rules.reasoning_rl.output.validation_curve,
             "r1": rules.r1.output.validation_curve,
             **{f"rl_only_{s}": res("rl_only", f"{s}_validation_curve.csv") for s in STUDENTS}}
SFT_CURVES = {"cold_start": rules.cold_start_sft.output.metrics, "r1_sft": rules.final_sft.output.metrics,
              **{f"distill_{s}": res("distill", f"{s}_sft_metrics.csv") for s in STUDENTS}}


rule r1_zero_report:
    input:
        summaries=expand(res("eval", "{model}", "{benchmark}", "summary.csv"),
                         model=[m for m in config["evaluation"]["models"] if m in ("base", "r1_zero")], benchmark=BENCHMARKS),
        metrics=rules.r1_zero.output.metrics,
        validation_curve=rules.r1_zero.output.validation_curve,
    output:
        table_csv=res("tables", "r1_zero.csv"),
        table_md=res("tables", "r1_zero.md"),
        accuracy_plot=report(res("plots", "r1_zero_accuracy.png"), caption="../report/accuracy.rst", category="R1-Zero"),
        length_plot=report(res("plots", "r1_zero_length.png"), caption="../report/length.rst", category="R1-Zero"),
        provenance=provenance("r1_zero_report"),
    params:
        **job("report.py", files="--summaries {input.summaries} --metrics {input.metrics}"
                    " --validation-curve {input.validation_curve} --table-csv {output.table_csv}"
                    " --table-md {output.table_md} --accuracy-plot {output.accuracy_plot} --length-plot {output.length_plot}"),
    log:
        res("logs", "r1_zero_report.log"),
    benchmark:
        res("benchmarks", "r1_zero_report.tsv")
    resources:
        **job_resources("r1_zero_report", mem_mb=1000, runtime=10),
    conda:
        conda_env("eval")
    shell:
        JOB


rule stage_curves:
    input:
        rl=list(RL_CURVES.values()),
        sft=list(SFT_CURVES.values()),
    output:
        plot=report(res("plots", "stages.png"), caption="../report/stages.rst", category="R1"),
        provenance=provenance("stage_curves"),
    params:
        **job("stage_curves.py", files=f"--rl {named_paths(RL_CURVES)} --sft {named_paths(SFT_CURVES)} --out {{output.plot}}"),
    log:
        res("logs", "stage_curves.log"),
    benchmark:
        res("benchmarks", "stage_curves.tsv")
    resources:
        **job_resources("stage_curves", mem_mb=1000, runtime=10),
    conda:
        conda_env("eval")
    shell:
        JOB
