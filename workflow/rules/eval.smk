# Section 3: n samples per problem at temperature 0.6 / top-p 0.95; pass@1, pass@k and cons@k.
# One job per (model, benchmark), so one benchmark can be rerun without regenerating the others.

EVAL_MODELS = list(config["evaluation"]["models"]) + list(config["evaluation"]["external_models"])
BENCHMARKS = list(config["evaluation"]["benchmarks"])


def eval_model_input(name):
    if name in config["evaluation"]["external_models"]:
        path = config["evaluation"]["external_models"][name]["path"]
        return path if os.path.exists(path) else []  # a local model is an input; a hub id is not
    return model_input(name)


# Models before the cold start answer in the Table 1 template; from the cold start on they are chat models
# answering in the readable pattern (section 2.3.1). A benchmark whose template is "model" uses each
# model's own style, so base, R1-Zero, R1 and the students can share one held-out table.
CHAT_STAGES = ("cold_start", "reasoning_rl", "r1_sft", "r1")


def is_chat_model(name):
    ext = config["evaluation"]["external_models"].get(name)
    if ext is not None:
        return bool(ext.get("chat"))
    return name in CHAT_STAGES or name.startswith("distill_")


def benchmark_spec(model, benchmark):
    spec = dict(config["evaluation"]["benchmarks"][benchmark])
    if spec.get("template") == "model":
        if model in config["evaluation"]["external_models"]:
            spec["template"] = "math"
        elif is_chat_model(model):
            spec["template"] = "plain"
            spec["format_reward"] = spec.get("format_reward") or "format_readable"
        else:
            spec["template"] = "table1"
    return shlex.quote(json.dumps(spec, sort_keys=True))


def eval_model_args(name):
    ext = config["evaluation"]["external_models"].get(name)
    if ext is None:
        return f"--model {model_arg(name)}" + (" --chat" if is_chat_model(name) else "")
    args = f"--model {shlex.quote(ext['path'])}"
    if ext.get("gguf_file"):
        args += f" --gguf-file {shlex.quote(ext['gguf_file'])}"
    return args + (" --chat" if ext.get("chat") else "")


def sampling_settings():
    """The evaluation settings every benchmark shares, without the lists of models and benchmarks: a
    job's params then change only when something it uses changes, so adding or editing one benchmark
    reruns that benchmark alone."""
    shared = {k: v for k, v in config["evaluation"].items() if k not in ("models", "external_models", "benchmarks")}
    return shlex.quote(json.dumps(shared, sort_keys=True))


def benchmark_data(name):
    """The synthetic held-out set is built by the `tasks` rule; a local benchmark file is an input."""
    spec = config["evaluation"]["benchmarks"][name]
    if spec["loader"] == "synthetic":
        return rules.tasks.output.test
    path = spec.get("path")
    return path if path and os.path.exists(path) else []


rule evaluate:
    input:
        model=lambda w: eval_model_input(w.model),
        data=lambda w: benchmark_data(w.benchmark),
    output:
        samples=res("eval", "{model}", "{benchmark}", "samples.parquet"),
        summary=res("eval", "{model}", "{benchmark}", "summary.csv"),
        provenance=provenance("evaluate_{model}_{benchmark}"),
    wildcard_constraints:
        model="|".join(EVAL_MODELS) or "NONE",
        benchmark="|".join(BENCHMARKS) or "NONE",
    params:
        model=lambda w: eval_model_args(w.model),
        model_ref=lambda w: shlex.quote(json.dumps(config["evaluation"]["external_models"].get(w.model, w.model))),
        spec=lambda w: benchmark_spec(w.model, w.benchmark),
        data=lambda w, input: f"--data {input.data}" if input.data else "",
        evaluation=sampling_settings(),
        rewards=settings("rewards"),
        generation=settings("generation"),
        dtype=config["base_model"]["dtype"],
    threads: job_threads("evaluate")
    log:
        res("logs", "evaluate_{model}_{benchmark}.log"),
    benchmark:
        res("benchmarks", "evaluate_{model}_{benchmark}.tsv")
    resources:
        **job_resources("evaluate", mem_mb=4000, runtime=30),
    conda:
        "../../envs/generate-vllm.yaml" if config["generation"]["backend"] == "vllm" else "../../envs/generate.yaml"
    shell:
        "{PROVENANCE} --record {output.provenance} --rule evaluate_{wildcards.model}_{wildcards.benchmark}"
        " --settings {params.model_ref} {params.spec} {params.evaluation} {params.rewards} {params.generation} {params.dtype}"
        " --inputs {input} --outputs {output} --"
        " {PYTHON} {SCRIPTS}/evaluate.py {params.model} --name {wildcards.model} --benchmark {wildcards.benchmark}"
        " --spec {params.spec} {params.data} --evaluation {params.evaluation} --rewards {params.rewards}"
        " --generation {params.generation} --dtype {params.dtype} --samples {output.samples}"
        " --summary {output.summary} --threads {threads} 2>&1 | tee {log}"


rule benchmark_table:
    """Every evaluated model on every configured benchmark, in the paper's layout."""
    input:
        summaries=expand(res("eval", "{model}", "{benchmark}", "summary.csv"), model=EVAL_MODELS, benchmark=BENCHMARKS),
    output:
        table_csv=res("tables", "benchmarks.csv"),
        table_md=report(res("tables", "benchmarks.md"), caption="../report/benchmarks.rst", category="Evaluation"),
        plot=report(res("plots", "benchmarks.png"), caption="../report/benchmarks.rst", category="Evaluation"),
        provenance=provenance("benchmark_table"),
    log:
        res("logs", "benchmark_table.log"),
    benchmark:
        res("benchmarks", "benchmark_table.tsv")
    resources:
        **job_resources("benchmark_table", mem_mb=1000, runtime=10),
    conda:
        "../../envs/eval.yaml"
    shell:
        "{PROVENANCE} --record {output.provenance} --rule benchmark_table --inputs {input} --outputs {output} --"
        " {PYTHON} {SCRIPTS}/tables.py --summaries {input.summaries} --table-csv {output.table_csv}"
        " --table-md {output.table_md} --plot {output.plot} --title Evaluation 2>&1 | tee {log}"
