# Section 3: k samples per held-out prompt at temperature 0.6 / top-p 0.95; pass@1 and cons@k.

EVAL_MODELS = ["base", "r1_zero"]


rule evaluate:
    input:
        model=lambda w: model_input(w.model),
        tasks=rules.tasks.output.test,
    output:
        samples=res("eval", "{model}", "samples.parquet"),
        summary=res("eval", "{model}", "summary.csv"),
    wildcard_constraints:
        model="|".join(EVAL_MODELS),
    params:
        model=lambda w: model_arg(w.model),
        evaluation=settings("evaluation"),
        rewards=settings("rewards"),
        template=config["template"],
        dtype=config["base_model"]["dtype"],
    threads: config["threads"]
    log:
        res("logs", "evaluate_{model}.log"),
    benchmark:
        res("benchmarks", "evaluate_{model}.tsv")
    resources:
        mem_mb=resource("evaluate", "mem_mb", 4000),
        runtime=resource("evaluate", "runtime", 30),
        gpus=resource("evaluate", "gpus", 0),
    conda:
        "../../envs/generate.yaml"
    shell:
        "{PYTHON} {SCRIPTS}/evaluate.py --model {params.model} --name {wildcards.model} --tasks {input.tasks}"
        " --evaluation {params.evaluation} --rewards {params.rewards} --template {params.template} --dtype {params.dtype}"
        " --samples {output.samples} --summary {output.summary} --threads {threads} 2>&1 | tee {log}"
