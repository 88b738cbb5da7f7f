# Section 3: k samples per held-out prompt at temperature 0.6 / top-p 0.95; pass@1 and cons@k.

EVAL_MODELS = ["base", "r1_zero"]


rule evaluate:
    input:
        model=lambda w: model_input(w.model),
        tasks=rules.tasks.output.test,
    output:
        samples=res("eval", "{model}", "samples.parquet"),
        summary=res("eval", "{model}", "summary.csv"),
        provenance=provenance("evaluate_{model}"),
    wildcard_constraints:
        model="|".join(EVAL_MODELS),
    params:
        model=lambda w: model_arg(w.model),
        evaluation=settings("evaluation"),
        generation=settings("generation"),
        template=config["template"],
        dtype=config["base_model"]["dtype"],
    threads: job_threads("evaluate")
    log:
        res("logs", "evaluate_{model}.log"),
    benchmark:
        res("benchmarks", "evaluate_{model}.tsv")
    resources:
        **job_resources("evaluate", mem_mb=4000, runtime=30),
    conda:
        "../../envs/generate-vllm.yaml" if config["generation"]["backend"] == "vllm" else "../../envs/generate.yaml"
    shell:
        "{PROVENANCE} --record {output.provenance} --rule evaluate_{wildcards.model}"
        " --settings {params.evaluation} {params.generation} {params.template} {params.dtype} {params.model} --inputs {input}"
        " --outputs {output} --"
        " {PYTHON} {SCRIPTS}/evaluate.py --model {params.model} --name {wildcards.model} --tasks {input.tasks}"
        " --evaluation {params.evaluation} --template {params.template} --dtype {params.dtype}"
        " --generation {params.generation} --samples {output.samples} --summary {output.summary} --threads {threads} 2>&1 | tee {log}"
