# DeepSeek-R1, section 2.3.2: reasoning-oriented RL from the cold-start checkpoint, the accuracy reward
# plus the language-consistency reward against language mixing, in the chat template.


rule reasoning_rl:
    input:
        model=rules.cold_start_sft.output.model,
        train=train_prompts(),
        validation=validation_prompts(),
    output:
        model=directory(res("models", "reasoning_rl")),
        metrics=res("reasoning_rl", "metrics.csv"),
        validation_curve=res("reasoning_rl", "validation_curve.csv"),
        provenance=provenance("reasoning_rl"),
    params:
        **job("grpo.py",
                    {"grpo": config["r1"]["reasoning_rl"], "rewards": config["rewards"], "template": "chat",
                     "model": res("models", "cold_start")},
                    GRPO_FILES, model=("generate", "train"), stage="reasoning_rl"),
    threads: job_threads("reasoning_rl")
    priority: 10  # the R1 chain, the critical path: before evaluations ready beside it
    log:
        res("logs", "reasoning_rl.log"),
    benchmark:
        res("benchmarks", "reasoning_rl.tsv")
    resources:
        **job_resources("reasoning_rl", mem_mb=4000, runtime=60),
    conda:
        conda_env("grpo", "reasoning_rl")
    shell:
        JOB
