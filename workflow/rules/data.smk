# Prompts with verifiable answers: synthetic tasks from a seed (embedded default) or real prompt files.


# (data.decontamination is the decontamination rule's: changing it does not rebuild the tasks)
rule tasks:
    output:
        train=res("data", "tasks", "train.parquet"),
        validation=res("data", "tasks", "validation.parquet"),
        test=res("data", "tasks", "test.parquet"),
        provenance=provenance("tasks"),
    params:
        **job("make_tasks.py", {"data": {k: v for k, v in config["data"].items() if k != "decontamination"}},
                    "--train {output.train} --validation {output.validation} --test {output.test}"),
    log:
        res("logs", "tasks.log"),
    benchmark:
        res("benchmarks", "tasks.tsv")
    resources:
        **job_resources("tasks", mem_mb=1000, runtime=10),
    conda:
        conda_env("train")
    shell:
        JOB
