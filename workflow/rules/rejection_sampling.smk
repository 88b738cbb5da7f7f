# DeepSeek-R1, section 2.3.3: rejection sampling from the reasoning-RL checkpoint, non-reasoning data,
# and two epochs of SFT of the base on both (the "R1 SFT" model).


rule rejection_sampling:
    input:
        model=rules.reasoning_rl.output.model,
        train=train_prompts(),
    output:
        data=res("data", "sft", "reasoning.parquet"),
        provenance=provenance("rejection_sampling"),
    params:
        **job("rejection_sampling.py", {"settings": config["r1"]["rejection_sampling"]},
                    "--model {input.model} --train {input.train} --out {output.data} --threads {threads}",
                    model=("generate",), stage="rejection_sampling"),
    threads: job_threads("rejection_sampling")
    priority: 10  # the R1 chain, the critical path: before evaluations ready beside it
    log:
        res("logs", "rejection_sampling.log"),
    benchmark:
        res("benchmarks", "rejection_sampling.tsv")
    resources:
        **job_resources("rejection_sampling", mem_mb=4000, runtime=60),
    conda:
        conda_env("generate", "rejection_sampling")
    shell:
        JOB


rule preferences:
    output:
        pairs=res("data", "preferences.parquet"),
        provenance=provenance("preferences"),
    params:
        **job("preferences.py", {"settings": preference_settings()}, "--out {output.pairs}"),
    log:
        res("logs", "preferences.log"),
    benchmark:
        res("benchmarks", "preferences.tsv")
    resources:
        **job_resources("preferences", mem_mb=1000, runtime=10),
    conda:
        conda_env("train")
    shell:
        JOB


rule non_reasoning_data:
    input:
        pairs=rules.preferences.output.pairs,
    output:
        data=res("data", "sft", "non_reasoning.parquet"),
        provenance=provenance("non_reasoning_data"),
    params:
        **job("non_reasoning.py", {"settings": config["r1"]["non_reasoning"]},
                    "--pairs {input.pairs} --out {output.data}"),
    log:
        res("logs", "non_reasoning_data.log"),
    benchmark:
        res("benchmarks", "non_reasoning_data.tsv")
    resources:
        **job_resources("non_reasoning_data", mem_mb=1000, runtime=10),
    conda:
        conda_env("train")
    shell:
        JOB


rule final_sft:
    input:
        base=model_input("base"),
        data=[rules.rejection_sampling.output.data, rules.non_reasoning_data.output.data],
    output:
        model=directory(res("models", "r1_sft")),
        metrics=res("r1_sft", "sft_metrics.csv"),
        provenance=provenance("final_sft"),
    params:
        **job("sft.py", {"settings": config["r1"]["final_sft"], **base_model_settings()}, SFT_FILES,
                    model=("train",), stage="final_sft"),
    threads: job_threads("final_sft")
    priority: 10  # the R1 chain, the critical path: before evaluations ready beside it
    log:
        res("logs", "final_sft.log"),
    benchmark:
        res("benchmarks", "final_sft.tsv")
    resources:
        **job_resources("final_sft", mem_mb=4000, runtime=60),
    conda:
        conda_env("train")
    shell:
        JOB
