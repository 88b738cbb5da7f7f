# Prompts with verifiable answers: synthetic tasks from a seed (embedded default) or real prompt files.


rule tasks:
    output:
        train=res("data", "tasks", "train.parquet"),
        validation=res("data", "tasks", "validation.parquet"),
        test=res("data", "tasks", "test.parquet"),
    params:
        data=settings("data"),
    log:
        res("logs", "tasks.log"),
    benchmark:
        res("benchmarks", "tasks.tsv")
    resources:
        mem_mb=resource("tasks", "mem_mb", 1000),
        runtime=resource("tasks", "runtime", 10),
    conda:
        "../../envs/train.yaml"
    shell:
        "{PYTHON} {SCRIPTS}/make_tasks.py --data {params.data} --train {output.train}"
        " --validation {output.validation} --test {output.test} 2>&1 | tee {log}"
