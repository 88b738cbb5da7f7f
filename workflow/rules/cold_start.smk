# DeepSeek-R1, section 2.3.1: a small set of long, readable chain-of-thought examples (few-shot prompting
# of the base, R1-Zero outputs rewritten, annotated chains) and SFT of the base on them. From the cold
# start on, models are chat models in the readable pattern (template "chat").


rule cold_start_data:
    input:
        base=model_input("base"),
        r1_zero=rules.r1_zero.output.model,
        train=train_prompts(),
    output:
        data=res("data", "sft", "cold_start.parquet"),
        provenance=provenance("cold_start_data"),
    params:
        **job("cold_start.py", {"settings": config["r1"]["cold_start"], **base_model_settings("base")},
                    "--r1-zero {input.r1_zero} --train {input.train} --out {output.data} --threads {threads}",
                    model=("generate",), stage="cold_start_data"),
    threads: job_threads("cold_start_data")
    priority: 10  # the R1 chain, the critical path: before evaluations ready beside it
    log:
        res("logs", "cold_start_data.log"),
    benchmark:
        res("benchmarks", "cold_start_data.tsv")
    resources:
        **job_resources("cold_start_data", mem_mb=4000, runtime=30),
    conda:
        conda_env("generate", "cold_start_data")
    shell:
        JOB


rule cold_start_sft:
    input:
        base=model_input("base"),
        data=rules.cold_start_data.output.data,
    output:
        model=directory(res("models", "cold_start")),
        metrics=res("cold_start", "sft_metrics.csv"),
        provenance=provenance("cold_start_sft"),
    params:
        **job("sft.py", {"settings": config["r1"]["sft"], **base_model_settings()}, SFT_FILES,
                    model=("train",), stage="cold_start_sft"),
    threads: job_threads("cold_start_sft")
    priority: 10  # the R1 chain, the critical path: before evaluations ready beside it
    log:
        res("logs", "cold_start_sft.log"),
    benchmark:
        res("benchmarks", "cold_start_sft.tsv")
    resources:
        **job_resources("cold_start_sft", mem_mb=4000, runtime=60),
    conda:
        conda_env("train")
    shell:
        JOB
