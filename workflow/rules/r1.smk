# DeepSeek-R1 (section 2.3): cold start -> reasoning-oriented RL -> rejection sampling + non-reasoning
# data -> SFT -> RL for all scenarios; and distillation (section 2.4) with the RL-only comparison (4.1).
# From the cold start on, models are chat models in the readable pattern (template "chat").

STUDENTS = list(config["distillation"]["students"])


def grpo_shell(stage):
    """The GRPO command shared by the RL stages (the r1_zero rule writes it out in full)."""
    return (
        "{PROVENANCE} --record {output.provenance} --rule " + stage +
        " --settings {params.grpo} {params.rewards} {params.generation} --inputs {input} --outputs {output} --"
        " {params.launch} {SCRIPTS}/grpo.py --model {params.model} --train {input.train} --validation {input.validation}"
        " --grpo {params.grpo} --rewards {params.rewards} --template {params.template} --state {params.state}"
        " --out-model {output.model} --metrics {output.metrics} --validation-curve {output.validation_curve}"
        " {params.extra} --stage " + stage +
        " --deepspeed {params.deepspeed} --generation {params.generation} --threads {threads} 2>&1 | tee {log}"
    )


def sft_shell(stage):
    return (
        "{PROVENANCE} --record {output.provenance} --rule " + stage +
        " --settings {params.sft} --inputs {input} --outputs {output} --"
        " {PYTHON} {SCRIPTS}/sft.py --model {params.model} --data {input.data} --settings {params.sft}"
        " --stage " + stage + " --out {output.model} --metrics {output.metrics} --threads {threads} 2>&1 | tee {log}"
    )


def rewards_with_models():
    """The rewards section with the reward models' folders filled in (trained here unless configured)."""
    opts = json.loads(json.dumps(config["rewards"]))
    for aspect in ("helpfulness", "harmlessness"):
        opts[aspect]["path"] = config["r1"]["reward_models"][f"{aspect}_path"] or res("models", f"rm_{aspect}")
    return shlex.quote(json.dumps(opts, sort_keys=True))


rule cold_start_data:
    input:
        base=model_input("base"),
        r1_zero=rules.r1_zero.output.model,
        train=rules.tasks.output.train,
    output:
        data=res("data", "sft", "cold_start.parquet"),
        provenance=provenance("cold_start_data"),
    params:
        base=model_arg("base"),
        s=settings("r1", "cold_start"),
        generation=settings("generation"),
    threads: job_threads("cold_start_data")
    log:
        res("logs", "cold_start_data.log"),
    benchmark:
        res("benchmarks", "cold_start_data.tsv")
    resources:
        **job_resources("cold_start_data", mem_mb=4000, runtime=30),
    conda:
        "../../envs/generate.yaml"
    shell:
        "{PROVENANCE} --record {output.provenance} --rule cold_start_data --settings {params.s} --inputs {input}"
        " --outputs {output} -- {PYTHON} {SCRIPTS}/cold_start.py --base {params.base} --r1-zero {input.r1_zero}"
        " --train {input.train} --settings {params.s} --generation {params.generation} --out {output.data}"
        " --threads {threads} 2>&1 | tee {log}"


rule cold_start_sft:
    input:
        base=model_input("base"),
        data=rules.cold_start_data.output.data,
    output:
        model=directory(res("models", "cold_start")),
        metrics=res("cold_start", "sft_metrics.csv"),
        provenance=provenance("cold_start_sft"),
    params:
        model=model_arg("base"),
        sft=settings("r1", "sft"),
    threads: job_threads("cold_start_sft")
    log:
        res("logs", "cold_start_sft.log"),
    benchmark:
        res("benchmarks", "cold_start_sft.tsv")
    resources:
        **job_resources("cold_start_sft", mem_mb=4000, runtime=60),
    conda:
        "../../envs/train.yaml"
    shell:
        sft_shell("cold_start_sft")


rule reasoning_rl:
    input:
        model=rules.cold_start_sft.output.model,
        train=rules.tasks.output.train,
        validation=rules.tasks.output.validation,
    output:
        model=directory(res("models", "reasoning_rl")),
        metrics=res("reasoning_rl", "metrics.csv"),
        validation_curve=res("reasoning_rl", "validation_curve.csv"),
        provenance=provenance("reasoning_rl"),
    params:
        model=res("models", "cold_start"),
        grpo=settings("r1", "reasoning_rl"),
        rewards=settings("rewards"),
        template="chat",
        state=res("state", "reasoning_rl"),
        extra="",
        deepspeed=settings("training", "deepspeed"),
        generation=settings("generation"),
        launch=launcher(),
    threads: job_threads("reasoning_rl")
    log:
        res("logs", "reasoning_rl.log"),
    benchmark:
        res("benchmarks", "reasoning_rl.tsv")
    resources:
        **job_resources("reasoning_rl", mem_mb=4000, runtime=60),
    conda:
        "../../envs/train.yaml"
    shell:
        grpo_shell("reasoning_rl")


rule rejection_sampling:
    input:
        model=rules.reasoning_rl.output.model,
        train=rules.tasks.output.train,
    output:
        data=res("data", "sft", "reasoning.parquet"),
        provenance=provenance("rejection_sampling"),
    params:
        s=settings("r1", "rejection_sampling"),
        generation=settings("generation"),
    threads: job_threads("rejection_sampling")
    log:
        res("logs", "rejection_sampling.log"),
    benchmark:
        res("benchmarks", "rejection_sampling.tsv")
    resources:
        **job_resources("rejection_sampling", mem_mb=4000, runtime=60),
    conda:
        "../../envs/generate.yaml"
    shell:
        "{PROVENANCE} --record {output.provenance} --rule rejection_sampling --settings {params.s} --inputs {input}"
        " --outputs {output} -- {PYTHON} {SCRIPTS}/rejection_sampling.py --model {input.model} --train {input.train}"
        " --settings {params.s} --generation {params.generation} --out {output.data} --threads {threads} 2>&1 | tee {log}"


rule preferences:
    output:
        pairs=res("data", "preferences.parquet"),
        provenance=provenance("preferences"),
    params:
        s=settings("r1", "reward_models", "pairs"),
    log:
        res("logs", "preferences.log"),
    benchmark:
        res("benchmarks", "preferences.tsv")
    resources:
        **job_resources("preferences", mem_mb=1000, runtime=10),
    conda:
        "../../envs/train.yaml"
    shell:
        "{PROVENANCE} --record {output.provenance} --rule preferences --settings {params.s} --outputs {output} --"
        " {PYTHON} {SCRIPTS}/preferences.py --out {output.pairs} --settings {params.s} 2>&1 | tee {log}"


rule non_reasoning_data:
    input:
        pairs=rules.preferences.output.pairs,
    output:
        data=res("data", "sft", "non_reasoning.parquet"),
        provenance=provenance("non_reasoning_data"),
    params:
        s=settings("r1", "non_reasoning"),
    log:
        res("logs", "non_reasoning_data.log"),
    benchmark:
        res("benchmarks", "non_reasoning_data.tsv")
    resources:
        **job_resources("non_reasoning_data", mem_mb=1000, runtime=10),
    conda:
        "../../envs/train.yaml"
    shell:
        "{PROVENANCE} --record {output.provenance} --rule non_reasoning_data --settings {params.s} --inputs {input}"
        " --outputs {output} -- {PYTHON} {SCRIPTS}/non_reasoning.py --pairs {input.pairs} --settings {params.s}"
        " --out {output.data} 2>&1 | tee {log}"


rule final_sft:
    input:
        base=model_input("base"),
        data=[rules.rejection_sampling.output.data, rules.non_reasoning_data.output.data],
    output:
        model=directory(res("models", "r1_sft")),
        metrics=res("r1_sft", "sft_metrics.csv"),
        provenance=provenance("final_sft"),
    params:
        model=model_arg("base"),
        sft=settings("r1", "final_sft"),
    threads: job_threads("final_sft")
    log:
        res("logs", "final_sft.log"),
    benchmark:
        res("benchmarks", "final_sft.tsv")
    resources:
        **job_resources("final_sft", mem_mb=4000, runtime=60),
    conda:
        "../../envs/train.yaml"
    shell:
        sft_shell("final_sft")


rule reward_model:
    input:
        base=model_input("base"),
        pairs=rules.preferences.output.pairs,
    output:
        model=directory(res("models", "rm_{aspect}")),
        metrics=res("reward_models", "{aspect}_metrics.csv"),
        provenance=provenance("reward_model_{aspect}"),
    wildcard_constraints:
        aspect="helpfulness|harmlessness",
    params:
        base=model_arg("base"),
        s=settings("r1", "reward_models", "train"),
    threads: job_threads("reward_model")
    log:
        res("logs", "reward_model_{aspect}.log"),
    benchmark:
        res("benchmarks", "reward_model_{aspect}.tsv")
    resources:
        **job_resources("reward_model", mem_mb=4000, runtime=30),
    conda:
        "../../envs/train.yaml"
    shell:
        "{PROVENANCE} --record {output.provenance} --rule reward_model_{wildcards.aspect} --settings {params.s}"
        " --inputs {input} --outputs {output} -- {PYTHON} {SCRIPTS}/reward_model.py --base {params.base}"
        " --pairs {input.pairs} --aspect {wildcards.aspect} --out {output.model} --metrics {output.metrics}"
        " --settings {params.s} --threads {threads} 2>&1 | tee {log}"


def reward_model_inputs(wildcards):
    return [res("models", f"rm_{a}") for a in ("helpfulness", "harmlessness")
            if not config["r1"]["reward_models"][f"{a}_path"]]


rule r1:
    """RL for all scenarios (section 2.3.4); its output is this run's DeepSeek-R1."""
    input:
        model=rules.final_sft.output.model,
        train=rules.tasks.output.train,
        validation=rules.tasks.output.validation,
        pairs=rules.preferences.output.pairs,
        reward_models=reward_model_inputs,
    output:
        model=directory(res("models", "r1")),
        metrics=res("r1", "metrics.csv"),
        validation_curve=res("r1", "validation_curve.csv"),
        provenance=provenance("r1"),
    params:
        model=res("models", "r1_sft"),
        grpo=settings("r1", "rl_all", "grpo"),
        rewards=rewards_with_models(),
        template="chat",
        state=res("state", "r1"),
        extra=lambda w, input: f"--general {input.pairs} --general-prompts {config['r1']['rl_all']['general_prompts']}",
        deepspeed=settings("training", "deepspeed"),
        generation=settings("generation"),
        launch=launcher(),
    threads: job_threads("r1")
    log:
        res("logs", "r1.log"),
    benchmark:
        res("benchmarks", "r1.tsv")
    resources:
        **job_resources("r1", mem_mb=4000, runtime=60),
    conda:
        "../../envs/train.yaml"
    shell:
        grpo_shell("r1")


rule student_base:
    """A small dense student (section 2.4); "tiny" builds one like the embedded base, smaller."""
    input:
        validation=rules.tasks.output.validation,
        test=rules.tasks.output.test,
    output:
        model=directory(res("models", "student_{student}")),
        loss=res("students", "{student}_pretrain_loss.csv"),
        provenance=provenance("student_base_{student}"),
    wildcard_constraints:
        student="|".join(STUDENTS) or "NONE",
    params:
        tiny=lambda w: shlex.quote(json.dumps({**config["base_model"]["tiny"],
                                               **config["distillation"]["students"][w.student]["tiny"]}, sort_keys=True)),
        families=settings("data", "synthetic", "families"),
        template=config["template"],
    threads: job_threads("student_base")
    log:
        res("logs", "student_base_{student}.log"),
    benchmark:
        res("benchmarks", "student_base_{student}.tsv")
    resources:
        **job_resources("student_base", mem_mb=4000, runtime=30),
    conda:
        "../../envs/train.yaml"
    shell:
        "{PROVENANCE} --record {output.provenance} --rule student_base_{wildcards.student}"
        " --settings {params.tiny} {params.families} {params.template} --inputs {input} --outputs {output} --"
        " {PYTHON} {SCRIPTS}/build_base.py --tiny {params.tiny} --families {params.families}"
        " --template {params.template} --exclude {input.validation} {input.test}"
        " --out {output.model} --loss {output.loss} --threads {threads} 2>&1 | tee {log}"


def student_model(student):
    path = config["distillation"]["students"][student]["path"]
    return res("models", f"student_{student}") if path == "tiny" else path


rule distill:
    """Section 2.4: SFT of the student on the curated SFT data (rejection samples + non-reasoning), no RL."""
    input:
        base=lambda w: student_model(w.student) if config["distillation"]["students"][w.student]["path"] == "tiny" else [],
        data=[rules.rejection_sampling.output.data, rules.non_reasoning_data.output.data],
    output:
        model=directory(res("models", "distill_{student}")),
        metrics=res("distill", "{student}_sft_metrics.csv"),
        provenance=provenance("distill_{student}"),
    wildcard_constraints:
        student="|".join(STUDENTS) or "NONE",
    params:
        model=lambda w: student_model(w.student),
        sft=settings("distillation", "sft"),
    threads: job_threads("distill")
    log:
        res("logs", "distill_{student}.log"),
    benchmark:
        res("benchmarks", "distill_{student}.tsv")
    resources:
        **job_resources("distill", mem_mb=4000, runtime=60),
    conda:
        "../../envs/train.yaml"
    shell:
        sft_shell("distill_{wildcards.student}")


rule rl_only:
    """Section 4.1: the same student trained by R1-Zero-style RL alone."""
    input:
        model=lambda w: student_model(w.student) if config["distillation"]["students"][w.student]["path"] == "tiny" else [],
        train=rules.tasks.output.train,
        validation=rules.tasks.output.validation,
    output:
        model=directory(res("models", "rl_only_{student}")),
        metrics=res("rl_only", "{student}_metrics.csv"),
        validation_curve=res("rl_only", "{student}_validation_curve.csv"),
        provenance=provenance("rl_only_{student}"),
    wildcard_constraints:
        student="|".join(STUDENTS) or "NONE",
    params:
        model=lambda w: student_model(w.student),
        grpo=settings("distillation", "rl_only"),
        rewards=settings("rewards"),
        template=config["template"],
        state=lambda w: res("state", f"rl_only_{w.student}"),
        extra="",
        deepspeed=settings("training", "deepspeed"),
        generation=settings("generation"),
        launch=launcher(),
    threads: job_threads("rl_only")
    log:
        res("logs", "rl_only_{student}.log"),
    benchmark:
        res("benchmarks", "rl_only_{student}.tsv")
    resources:
        **job_resources("rl_only", mem_mb=4000, runtime=60),
    conda:
        "../../envs/train.yaml"
    shell:
        grpo_shell("rl_only_{wildcards.student}")


RL_CURVES = {"r1_zero": rules.r1_zero.output.validation_curve, "reasoning_rl": rules.reasoning_rl.output.validation_curve,
             "r1": rules.r1.output.validation_curve,
             **{f"rl_only_{s}": res("rl_only", f"{s}_validation_curve.csv") for s in STUDENTS}}
SFT_CURVES = {"cold_start": rules.cold_start_sft.output.metrics, "r1_sft": rules.final_sft.output.metrics,
              **{f"distill_{s}": res("distill", f"{s}_sft_metrics.csv") for s in STUDENTS}}


rule stage_curves:
    input:
        rl=list(RL_CURVES.values()),
        sft=list(SFT_CURVES.values()),
    output:
        plot=report(res("plots", "stages.png"), caption="../report/stages.rst", category="R1"),
        provenance=provenance("stage_curves"),
    params:
        rl=" ".join(f"{k}={v}" for k, v in RL_CURVES.items()),
        sft=" ".join(f"{k}={v}" for k, v in SFT_CURVES.items()),
    log:
        res("logs", "stage_curves.log"),
    benchmark:
        res("benchmarks", "stage_curves.tsv")
    resources:
        **job_resources("stage_curves", mem_mb=1000, runtime=10),
    conda:
        "../../envs/eval.yaml"
    shell:
        "{PROVENANCE} --record {output.provenance} --rule stage_curves --inputs {input} --outputs {output} --"
        " {PYTHON} {SCRIPTS}/stage_curves.py --rl {params.rl} --sft {params.sft} --out {output.plot} 2>&1 | tee {log}"
