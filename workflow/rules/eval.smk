# Section 3: n samples per problem at temperature 0.6 / top-p 0.95; pass@1, pass@k and cons@k.
# One job per (model, benchmark), so one benchmark can be rerun without regenerating the others.


rule evaluate:
    input:
        model=eval_model_input,
        data=benchmark_data,
    output:
        samples=res("eval", "{model}", "{benchmark}", "samples.parquet"),
        summary=res("eval", "{model}", "{benchmark}", "summary.csv"),
        provenance=provenance("evaluate_{model}_{benchmark}"),
    wildcard_constraints:
        model="|".join(EVAL_MODELS) or "NONE",
        benchmark="|".join(BENCHMARKS) or "NONE",
    params:
        **job("evaluate.py",
                    {"model": eval_model, "gguf_file": eval_gguf_file, "chat": eval_chat, "spec": benchmark_spec,
                     "data": benchmark_data_arg, "evaluation": sampling_settings(), "rewards": config["rewards"]},
                    "--name {wildcards.model} --benchmark {wildcards.benchmark} --samples {output.samples}"
                    " --summary {output.summary} --threads {threads}", model=("generate",), stage="evaluate"),
    threads: job_threads("evaluate")
    log:
        res("logs", "evaluate_{model}_{benchmark}.log"),
    benchmark:
        res("benchmarks", "evaluate_{model}_{benchmark}.tsv")
    resources:
        **job_resources("evaluate", mem_mb=4000, runtime=30),
    conda:
        conda_env("generate", "evaluate")
    shell:
        JOB


rule benchmark_table:
    """Every evaluated model on every configured benchmark, in the paper's layout."""
    input:
        summaries=expand(res("eval", "{model}", "{benchmark}", "summary.csv"), model=EVAL_MODELS, benchmark=BENCHMARKS),
    output:
        table_csv=res("tables", "benchmarks.csv"),
        table_md=report(res("tables", "benchmarks.md"), caption="../report/benchmarks.rst", category="Evaluation"),
        plot=report(res("plots", "benchmarks.png"), caption="../report/benchmarks.rst", category="Evaluation"),
        provenance=provenance("benchmark_table"),
    params:
        **job("tables.py", {"title": "Evaluation"},
                    "--summaries {input.summaries} --table-csv {output.table_csv} --table-md {output.table_md}"
                    " --plot {output.plot}"),
    log:
        res("logs", "benchmark_table.log"),
    benchmark:
        res("benchmarks", "benchmark_table.tsv")
    resources:
        **job_resources("benchmark_table", mem_mb=1000, runtime=10),
    conda:
        conda_env("eval")
    shell:
        JOB
