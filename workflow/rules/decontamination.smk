# Decontamination (open-r1's scripts/decontaminate.py): 8-gram overlap of the train and validation prompts
# with every benchmark's questions, always reported; with data.decontamination.drop the RL and sampling
# stages train on copies of the splits without the contaminated prompts (train_prompts, validation_prompts).
BENCHMARK_FILES = benchmark_files()


rule decontamination:
    input:
        train=rules.tasks.output.train,
        validation=rules.tasks.output.validation,
        benchmarks=list(BENCHMARK_FILES.values()),
    output:
        table_csv=res("tables", "decontamination.csv"),
        table_md=res("tables", "decontamination.md"),
        matches=res("data", "decontamination", "matches.csv"),
        **({"train": res("data", "tasks", "decontaminated", "train.parquet"),
            "validation": res("data", "tasks", "decontaminated", "validation.parquet")} if decontamination_drops() else {}),
        provenance=provenance("decontamination"),
    params:
        **job("decontaminate.py",
                    {"settings": config["data"]["decontamination"], "benchmarks": config["evaluation"]["benchmarks"]},
                    f"--data {named_paths(BENCHMARK_FILES)} --train {{input.train}} --validation {{input.validation}}"
                    " --table-csv {output.table_csv} --table-md {output.table_md} --matches {output.matches}"
                    + (" --train-out {output.train} --validation-out {output.validation}" if decontamination_drops() else "")),
    log:
        res("logs", "decontamination.log"),
    benchmark:
        res("benchmarks", "decontamination.tsv")
    resources:
        **job_resources("decontamination", mem_mb=1000, runtime=10),
    conda:
        conda_env("train")
    shell:
        JOB
