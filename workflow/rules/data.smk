# Prompts with verifiable answers: synthetic tasks from a seed (embedded default) or real prompt files.


rule tasks:
    output:
        train=res("data", "tasks", "train.parquet"),
        validation=res("data", "tasks", "validation.parquet"),
        test=res("data", "tasks", "test.parquet"),
        provenance=provenance("tasks"),
    params:
        data=settings("data"),
    log:
        res("logs", "tasks.log"),
    benchmark:
        res("benchmarks", "tasks.tsv")
    resources:
        **job_resources("tasks", mem_mb=1000, runtime=10),
    conda:
        "../../envs/train.yaml"
    shell:
        "{PROVENANCE} --record {output.provenance} --rule tasks --settings {params.data} --outputs {output} --"
        " {PYTHON} {SCRIPTS}/make_tasks.py --data {params.data} --train {output.train}"
        " --validation {output.validation} --test {output.test} 2>&1 | tee {log}"
