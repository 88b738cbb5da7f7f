# DeepSeek-R1, section 2.3.4: reward models of human preference (helpfulness, harmlessness), then RL
# for all scenarios from the R1 SFT model, rule-based rewards on reasoning prompts and the reward
# models on general prompts. Its output is this run's DeepSeek-R1.


rule reward_model:
    input:
        base=reward_model_base_input(),
        pairs=rules.preferences.output.pairs,
    output:
        model=directory(res("models", "rm_{aspect}")),
        metrics=res("reward_models", "{aspect}_metrics.csv"),
        provenance=provenance("reward_model_{aspect}"),
    wildcard_constraints:
        aspect="helpfulness|harmlessness",
    params:
        **job("reward_model.py", {"settings": config["r1"]["reward_models"]["train"], **reward_model_base_settings()},
                    "--pairs {input.pairs} --aspect {wildcards.aspect} --out {output.model}"
                    " --metrics {output.metrics} --threads {threads}", model=("train",), stage="reward_model"),
    threads: job_threads("reward_model")
    log:
        res("logs", "reward_model_{aspect}.log"),
    benchmark:
        res("benchmarks", "reward_model_{aspect}.tsv")
    resources:
        **job_resources("reward_model", mem_mb=4000, runtime=30),
    conda:
        conda_env("train")
    shell:
        JOB


rule r1:
    """RL for all scenarios (section 2.3.4); its output is this run's DeepSeek-R1."""
    input:
        model=rules.final_sft.output.model,
        train=train_prompts(),
        validation=validation_prompts(),
        pairs=rules.preferences.output.pairs,
        reward_models=reward_model_inputs,
    output:
        model=directory(res("models", "r1")),
        metrics=res("r1", "metrics.csv"),
        validation_curve=res("r1", "validation_curve.csv"),
        provenance=provenance("r1"),
    params:
        **job("grpo.py",
                    {"grpo": config["r1"]["rl_all"]["grpo"], "rewards": rewards_with_models(), "template": "chat",
                     "model": res("models", "r1_sft"), "general": rules.preferences.output.pairs,
                     "general_prompts": config["r1"]["rl_all"]["general_prompts"]},
                    GRPO_FILES, model=("generate", "train"), stage="r1"),
    threads: job_threads("r1")
    priority: 10  # the R1 chain, the critical path: before evaluations ready beside it
    log:
        res("logs", "r1.log"),
    benchmark:
        res("benchmarks", "r1.tsv")
    resources:
        **job_resources("r1", mem_mb=4000, runtime=60),
    conda:
        conda_env("grpo", "r1")
    shell:
        JOB
