# Distillation (section 2.4): a smaller dense student fine-tuned on the curated SFT data, no RL; and the
# same student trained by R1-Zero-style RL alone (section 4.1), for the comparison.


rule student_base:
    """A small dense student (section 2.4); "tiny" builds one like the embedded base, smaller."""
    input:
        # the tasks rule's own splits, as base_model's: held out of the pretraining corpus, not trained on
        # (data.decontamination.drop does not apply to them)
        validation=rules.tasks.output.validation,
        test=rules.tasks.output.test,
        allowed=tiny_student_allowed,
        tokenizer=tiny_student_tokenizer_input,
    output:
        model=directory(res("models", "student_{student}")),
        loss=res("students", "{student}_pretrain_loss.csv"),
        provenance=provenance("student_base_{student}"),
    wildcard_constraints:
        student="|".join(STUDENTS) or "NONE",
    params:
        **job("build_base.py",
                    {"tiny": student_tiny, "families": config["data"]["synthetic"]["families"],
                     "template": config["template"], "tokenizer": tiny_student_tokenizer()},
                    "--exclude {input.validation} {input.test} --out {output.model} --loss {output.loss}"
                    " --threads {threads}", model=("pretrain",), stage="student_base"),
    threads: job_threads("student_base")
    log:
        res("logs", "student_base_{student}.log"),
    benchmark:
        res("benchmarks", "student_base_{student}.tsv")
    resources:
        **job_resources("student_base", mem_mb=4000, runtime=30),
    conda:
        conda_env("train")
    shell:
        JOB


rule distill:
    """Section 2.4: SFT of the student on the curated SFT data (rejection samples + non-reasoning), no RL."""
    input:
        base=student_input,
        data=[rules.rejection_sampling.output.data, rules.non_reasoning_data.output.data],
    output:
        model=directory(res("models", "distill_{student}")),
        metrics=res("distill", "{student}_sft_metrics.csv"),
        provenance=provenance("distill_{student}"),
    wildcard_constraints:
        student="|".join(STUDENTS) or "NONE",
    params:
        **job("sft.py", {"settings": config["distillation"]["sft"], "model": student_model, "gguf_file": student_gguf}, SFT_FILES,
                    model=("train",), stage="distill"),
    threads: job_threads("distill")
    log:
        res("logs", "distill_{student}.log"),
    benchmark:
        res("benchmarks", "distill_{student}.tsv")
    resources:
        **job_resources("distill", mem_mb=4000, runtime=60),
    conda:
        conda_env("train")
    shell:
        JOB


rule rl_only:
    """Section 4.1: the same student trained by R1-Zero-style RL alone."""
    input:
        model=student_input,
        train=train_prompts(),
        validation=validation_prompts(),
    output:
        model=directory(res("models", "rl_only_{student}")),
        metrics=res("rl_only", "{student}_metrics.csv"),
        validation_curve=res("rl_only", "{student}_validation_curve.csv"),
        provenance=provenance("rl_only_{student}"),
    wildcard_constraints:
        student="|".join(STUDENTS) or "NONE",
    params:
        **job("grpo.py",
                    {"grpo": config["distillation"]["rl_only"], "rewards": config["rewards"],
                     "template": config["template"], "model": student_model, "gguf_file": student_gguf},
                    GRPO_FILES, model=("generate", "train"), stage="rl_only"),
    threads: job_threads("rl_only")
    log:
        res("logs", "rl_only_{student}.log"),
    benchmark:
        res("benchmarks", "rl_only_{student}.tsv")
    resources:
        **job_resources("rl_only", mem_mb=4000, runtime=60),
    conda:
        conda_env("grpo", "rl_only")
    shell:
        JOB
