# DeepSeek-R1-Zero (section 2.2): GRPO straight on the base model with rule-based rewards.
# Resumable state lives in results/state/r1_zero, outside the declared outputs, so a killed or failed
# job resumes from its last checkpoint when the target is requested again.


rule r1_zero:
    input:
        base=model_input("base"),
        train=rules.tasks.output.train,
        validation=rules.tasks.output.validation,
    output:
        model=directory(res("models", "r1_zero")),
        metrics=res("r1_zero", "metrics.csv"),
        validation_curve=res("r1_zero", "validation_curve.csv"),
    params:
        base=model_arg("base"),
        grpo=settings("r1_zero", "grpo"),
        rewards=settings("rewards"),
        template=config["template"],
        dtype=config["base_model"]["dtype"],
        state=res("state", "r1_zero"),
    threads: config["threads"]
    log:
        res("logs", "r1_zero.log"),
    benchmark:
        res("benchmarks", "r1_zero.tsv")
    resources:
        mem_mb=resource("r1_zero", "mem_mb", 4000),
        runtime=resource("r1_zero", "runtime", 60),
        gpus=resource("r1_zero", "gpus", 0),
    conda:
        "../../envs/train.yaml"
    shell:
        "{PYTHON} {SCRIPTS}/grpo.py --model {params.base} --train {input.train} --validation {input.validation}"
        " --grpo {params.grpo} --rewards {params.rewards} --template {params.template} --dtype {params.dtype} --state {params.state}"
        " --out-model {output.model} --metrics {output.metrics} --validation-curve {output.validation_curve}"
        " --threads {threads} 2>&1 | tee {log}"
