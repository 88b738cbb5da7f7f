# DeepSeek-R1-Zero (section 2.2): GRPO straight on the base model with rule-based rewards.
# Resumable state lives in results/state/r1_zero, outside the declared outputs, so a killed or failed
# job resumes from its last checkpoint when the target is requested again.


rule r1_zero:
    input:
        base=model_input("base"),
        train=train_prompts(),
        validation=validation_prompts(),
    output:
        model=directory(res("models", "r1_zero")),
        metrics=res("r1_zero", "metrics.csv"),
        validation_curve=res("r1_zero", "validation_curve.csv"),
        provenance=provenance("r1_zero"),
    params:
        **job("grpo.py",
                    {"grpo": config["r1_zero"]["grpo"], "rewards": config["rewards"], "template": config["template"],
                     **base_model_settings()},
                    GRPO_FILES, model=("generate", "train"), stage="r1_zero"),
    threads: job_threads("r1_zero")
    # the R1 chain waits for it; the student and the reward models fill the other core meanwhile
    priority: 10
    log:
        res("logs", "r1_zero.log"),
    benchmark:
        res("benchmarks", "r1_zero.tsv")
    resources:
        **job_resources("r1_zero", mem_mb=4000, runtime=60),
    conda:
        conda_env("grpo", "r1_zero")
    shell:
        JOB
