# The stand-in for DeepSeek-V3-Base: a tiny Llama with its own BPE tokenizer, briefly pretrained on a
# synthetic corpus (only when base_model.path is "tiny"; otherwise the configured model is used as is).


rule base_model:
    input:
        validation=rules.tasks.output.validation,
        test=rules.tasks.output.test,
    output:
        model=directory(res("models", "base")),
        loss=res("base", "pretrain_loss.csv"),
    params:
        tiny=settings("base_model", "tiny"),
        families=settings("data", "synthetic", "families"),
        template=config["template"],
    threads: config["threads"]
    log:
        res("logs", "base_model.log"),
    benchmark:
        res("benchmarks", "base_model.tsv")
    resources:
        mem_mb=resource("base_model", "mem_mb", 4000),
        runtime=resource("base_model", "runtime", 30),
    conda:
        "../../envs/train.yaml"
    shell:
        "{PYTHON} {SCRIPTS}/build_base.py --tiny {params.tiny} --families {params.families}"
        " --template {params.template} --exclude {input.validation} {input.test}"
        " --out {output.model} --loss {output.loss} --threads {threads} 2>&1 | tee {log}"
