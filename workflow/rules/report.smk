# Tables like the paper's and the miniature Figures 2 and 3.


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
    log:
        res("logs", "r1_zero_report.log"),
    benchmark:
        res("benchmarks", "r1_zero_report.tsv")
    resources:
        **job_resources("r1_zero_report", mem_mb=1000, runtime=10),
    conda:
        "../../envs/eval.yaml"
    shell:
        "{PROVENANCE} --record {output.provenance} --rule r1_zero_report --inputs {input} --outputs {output} --"
        " {PYTHON} {SCRIPTS}/report.py --summaries {input.summaries} --metrics {input.metrics}"
        " --validation-curve {input.validation_curve} --table-csv {output.table_csv} --table-md {output.table_md}"
        " --accuracy-plot {output.accuracy_plot} --length-plot {output.length_plot} 2>&1 | tee {log}"
