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
        provenance=provenance("r1_zero"),
    params:
        base=model_arg("base"),
        grpo=settings("r1_zero", "grpo"),
        rewards=settings("rewards"),
        template=config["template"],
        dtype=config["base_model"]["dtype"],
        state=res("state", "r1_zero"),
        deepspeed=settings("training", "deepspeed"),
        generation=settings("generation"),
        launch=launcher(),
    threads: job_threads("r1_zero")
    log:
        res("logs", "r1_zero.log"),
    benchmark:
        res("benchmarks", "r1_zero.tsv")
    resources:
        **job_resources("r1_zero", mem_mb=4000, runtime=60),
    conda:
        "../../envs/train.yaml"
    shell:
        "{PROVENANCE} --record {output.provenance} --rule r1_zero"
        " --settings {params.grpo} {params.rewards} {params.template} {params.dtype} {params.base} {params.deepspeed} {params.generation} --inputs {input} --outputs {output} --"
        " {params.launch} {SCRIPTS}/grpo.py --model {params.base} --train {input.train} --validation {input.validation}"
        " --grpo {params.grpo} --rewards {params.rewards} --template {params.template} --dtype {params.dtype} --state {params.state}"
        " --out-model {output.model} --metrics {output.metrics} --validation-curve {output.validation_curve}"
        " --deepspeed {params.deepspeed} --generation {params.generation} --threads {threads} 2>&1 | tee {log}"
