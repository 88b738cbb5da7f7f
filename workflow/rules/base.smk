# The stand-in for DeepSeek-V3-Base: a tiny Llama with its own BPE tokenizer, briefly pretrained on a
# synthetic corpus (only when base_model.path is "tiny"; otherwise the configured model is used as is).


rule base_model:
    input:
        validation=rules.tasks.output.validation,
        test=rules.tasks.output.test,
    output:
        model=directory(res("models", "base")),
        loss=res("base", "pretrain_loss.csv"),
        provenance=provenance("base_model"),
    params:
        **job("build_base.py",
                    {"tiny": config["base_model"]["tiny"], "families": config["data"]["synthetic"]["families"],
                     "template": config["template"]},
                    "--exclude {input.validation} {input.test} --out {output.model} --loss {output.loss}"
                    " --threads {threads}", model=("pretrain",), stage="base_model"),
    threads: job_threads("base_model")
    # everything waits for the base (the tiny student reads its tokenizer): start it before anything else
    priority: 10
    log:
        res("logs", "base_model.log"),
    benchmark:
        res("benchmarks", "base_model.tsv")
    resources:
        **job_resources("base_model", mem_mb=4000, runtime=30),
    conda:
        conda_env("train")
    shell:
        JOB
