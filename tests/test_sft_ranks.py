"""SFT and reward-model training on 2 CPU ranks (torchrun, gloo) against one process, under DeepSpeed
ZeRO-2 and under FSDP2 (engine fsdp2, zero_stage 3: weights, gradients and AdamW state sharded), and their
scripts writing their outputs once, on rank 0 (FSDP2: gathered by every rank, written by rank 0).

This file is also the worker torchrun starts (`python tests/test_sft_ranks.py --worker ...`): one launch
runs every case, each rank compares with the same training in one process (LocalEngine), and rank 0
writes the results as JSON. Tolerance as in tests/test_deepspeed.py: fp32 throughout, the ranks differ
from one process only in the order of float sums, so losses and weights agree to 1e-5 absolute.
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-5
DS = {"enabled": True, "zero_stage": 2, "accelerator": "cpu"}
FSDP = {"enabled": True, "engine": "fsdp2", "zero_stage": 3}
ENGINES = {"zero2": DS, "fsdp2": FSDP}
PAIRS = [(1, 2), (3, 4), (5, 6), (7, 1), (2, 2), (9, 0), (4, 4)]
# 7 examples in batches of 3, micro-batches of 1 row, one epoch: 3 steps of 3, 3 and 1 rows. On 2 ranks the
# shares are 2 and 1 rows (rank 1 runs one zero-weighted filler micro-batch), then 1 and 0 (a filler)
SFT_KW = dict(epochs=1, learning_rate=1e-3, batch_size=3, micro_batch_size=1, max_length=64, warmup_steps=0, seed=0)
RM_KW = dict(steps=2, lr=1e-3, batch_size=3, seed=0, max_length=96)  # shares of 2 and 1 pairs
RM_FILLER_KW = dict(RM_KW, batch_size=1)  # one pair per step: rank 1 scores a filler pair with weight 0


def sft_examples():
    return ([f"Compute {a}+{b}:" for a, b in PAIRS], [f" {a}+{b}={a + b}. So the answer is {a + b}." for a, b in PAIRS])


# -- one process ----------------------------------------------------------------------------------
def test_rank_shares_cover_the_batch_with_as_many_micro_batches_on_every_rank():
    import torch

    from r1flow.training.sft import SFTBatch, rank_micro_batches

    b = SFTBatch(torch.arange(5)[:, None], torch.ones(5, 1, dtype=torch.long), torch.arange(5)[:, None])
    rows = lambda mbs: [None if m is None else m.input_ids[:, 0].tolist() for m in mbs]  # noqa: E731
    assert rows(rank_micro_batches(b, 0, 1, 2)) == [[0, 1], [2, 3], [4]]  # one process: as before
    assert rows(rank_micro_batches(b, 0, 1)) == [[0, 1, 2, 3, 4]]
    assert rows(rank_micro_batches(b, 0, 2, 2)) == [[0, 1], [2]]
    assert rows(rank_micro_batches(b, 1, 2, 2)) == [[3, 4], None]
    assert rows(rank_micro_batches(b[:1], 1, 2)) == [None]  # fewer rows than ranks


# -- two ranks (the worker) -------------------------------------------------------------------------
def weights(model) -> dict:
    """name -> whole tensor; gathered from the ranks for an FSDP2-sharded model (a collective)."""
    from r1flow.models import full_parameters

    return {n: t.float() for n, t in full_parameters(model, state=False)}


def max_diff(a, b) -> float:
    wa, wb = (x if isinstance(x, dict) else weights(x) for x in (a, b))
    assert list(wa) == list(wb)
    return max((wa[n] - wb[n]).abs().max().item() for n in wa)


def rows_diff(a: list[dict], b: list[dict]) -> float:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x if k != "step" and k != "epoch")


def gather(obj) -> list:
    import torch

    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def worker_sft(model_path, ds, tmp):
    from r1flow.models import load_policy
    from r1flow.training.sft import train_sft

    model0, tok = load_policy(model_path)
    prompts, completions = sft_examples()
    single, dist = copy.deepcopy(model0), copy.deepcopy(model0)
    rows_single = train_sft(single, tok, prompts, completions, **SFT_KW)
    rows_dist = train_sft(dist, tok, prompts, completions, deepspeed=ds, **SFT_KW)
    out = {"steps": len(rows_dist), "rows_abs_diff": rows_diff(rows_single, rows_dist),
           "rows_same_on_every_rank": all(r == rows_dist for r in gather(rows_dist)),
           "weights_max_abs_diff": max_diff(single, dist), "weights_moved": max_diff(single, model0)}
    if ds is FSDP:
        out.update(saved_and_resumed(model0, tok, single, rows_single, tmp))
    return out


def saved_and_resumed(model0, tok, single, rows_single, tmp):
    """FSDP2: the sharded model saved as a plain folder (save_policy on every rank) holds the one-process
    weights; a run that crashes after its step-2 checkpoint (every rank raising before step 3's first
    collective, as a kill would leave it: nothing saved past the checkpoint) resumes to the same rows and
    weights from a fresh model."""
    import torch
    from safetensors.torch import load_file

    import r1flow.training.sft as S
    from r1flow.models import save_policy

    state, saved = tmp / "sft_state", tmp / "fsdp_saved"
    crashed = copy.deepcopy(model0)
    step, calls = S.sft_step, [0]

    def crash_at_step_3(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("crash")
        return step(*a, **k)

    S.sft_step = crash_at_step_3
    try:
        S.train_sft(crashed, tok, *sft_examples(), deepspeed=FSDP, state_dir=state, save_every=1, **SFT_KW)
    except RuntimeError:
        pass
    finally:
        S.sft_step = step
    checkpointed = json.loads((state / "checkpoint" / "state.json").read_text())["step"]
    resumed, ran = copy.deepcopy(model0), [0]

    def counted(*a, **k):
        ran[0] += 1
        return step(*a, **k)

    S.sft_step = counted
    try:
        rows = S.train_sft(resumed, tok, *sft_examples(), deepspeed=FSDP, state_dir=state, save_every=1, **SFT_KW)
    finally:
        S.sft_step = step
    out = {"checkpointed_step": checkpointed, "updates_after_resume": ran[0],
           "resumed_rows_abs_diff": rows_diff(rows_single, rows),
           "resumed_weights_max_abs_diff": max_diff(single, resumed)}
    save_policy(resumed, tok, saved)  # collective: rank 0 writes
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        files, plain = load_file(str(saved / "model.safetensors")), weights(single)
        out.update(saved_max_abs_diff=max((files[n].float() - plain[n]).abs().max().item() for n in files),
                   saved_names_missing=sorted(set(plain) - set(files)),
                   saved_dtype=str(next(iter(files.values())).dtype))
    return out


def worker_rm(model_path, kw, ds):
    import pandas as pd
    import torch

    from r1flow.data.preferences import make_preferences
    from r1flow.models.reward_model import load_reward_model
    from r1flow.training.reward_model import train_reward_model

    pairs = make_preferences(6, 0, seed=0)
    single, _, m_single = train_reward_model(model_path, pairs, "helpfulness", None, **kw)
    dist, _, m_dist = train_reward_model(model_path, pairs, "helpfulness", None, deepspeed=ds, **kw)
    torch.manual_seed(kw["seed"])  # the score head train_reward_model starts from
    start = load_reward_model(model_path)[0]
    rows = m_dist.to_dict("records")
    return {"steps": len(m_dist), "rows_abs_diff": rows_diff(m_single.to_dict("records"), rows),
            "rows_same_on_every_rank": all(r == rows for r in gather(rows)),
            "weights_max_abs_diff": max_diff(single, dist), "weights_moved": max_diff(single, start),
            "loss_is_finite": bool(pd.notna(m_dist["loss"]).all())}


def worker_scripts(files: dict, ds: dict) -> dict:
    """Both scripts' main() on every rank, counting who saves the model folder and who writes metrics."""
    import r1flow.training.reward_model as RM

    sys.path.insert(0, str(ROOT / "scripts"))
    import reward_model as rm_script
    import sft as sft_script

    calls = {"save": 0, "write": 0}

    def counting(fn, key):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    sft_script.save_policy = counting(sft_script.save_policy, "save")
    sft_script.write_table = counting(sft_script.write_table, "write")
    RM.save_policy = counting(RM.save_policy, "save")
    rm_script.write_table = counting(rm_script.write_table, "write")
    ds = json.dumps(ds)
    sft_settings = {k: SFT_KW[k] for k in ("epochs", "learning_rate", "batch_size", "micro_batch_size",
                                          "max_length", "warmup_steps", "seed")}
    argv = sys.argv
    try:
        sys.argv = ["sft.py", "--model", files["model"], "--data", files["sft_data"], "--settings",
                    json.dumps(sft_settings), "--out", files["sft_out"], "--metrics", files["sft_metrics"],
                    "--deepspeed", ds]
        sft_script.main()
        sys.argv = ["reward_model.py", "--base", files["model"], "--pairs", files["pairs"], "--aspect",
                    "helpfulness", "--out", files["rm_out"], "--metrics", files["rm_metrics"], "--settings",
                    json.dumps(RM_KW), "--deepspeed", ds]
        rm_script.main()
    finally:
        sys.argv = argv
    return {"calls_by_rank": gather(calls)}


def worker(a):
    import torch

    torch.set_num_threads(1)
    ds = ENGINES[a.engine]
    # the first engine initialises the process group
    out = {"sft": worker_sft(a.model, ds, Path(a.out).parent)}  # a folder all ranks share
    out["world_size"] = torch.distributed.get_world_size()
    out["rm"] = worker_rm(a.model, RM_KW, ds)
    out["rm_filler"] = worker_rm(a.model, RM_FILLER_KW, ds)
    out["scripts"] = worker_scripts(json.loads(a.files), ds)
    if torch.distributed.get_rank() == 0:
        Path(a.out).write_text(json.dumps(out, indent=2))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# -- two ranks (the tests) --------------------------------------------------------------------------
@pytest.fixture(scope="module", params=sorted(ENGINES))
def two_ranks(request, tiny_policy, tmp_path_factory):
    """One torchrun launch of this file's worker on 2 CPU ranks per engine; (its results, the input and
    output files, the engine)."""
    if request.param == "zero2" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[distributed]')")
    import pandas as pd

    from r1flow.data.artifacts import write_table
    from r1flow.data.preferences import make_preferences
    from r1flow.data.schemas import PREFERENCES, SFT_DATA

    tmp = tmp_path_factory.mktemp(f"ranks-{request.param}")
    prompts, completions = sft_examples()
    sft = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(prompts))],
                        "messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]
                                     for p, c in zip(prompts, completions)],
                        "source": "test", "stop_reason": "written"})
    write_table(sft, tmp / "sft.parquet", SFT_DATA)
    write_table(make_preferences(6, 0, seed=0), tmp / "pairs.parquet", PREFERENCES)
    files = {"model": str(tiny_policy[0]), "sft_data": str(tmp / "sft.parquet"), "pairs": str(tmp / "pairs.parquet"),
             "sft_out": str(tmp / "sft_model"), "sft_metrics": str(tmp / "sft_metrics.csv"),
             "rm_out": str(tmp / "rm_model"), "rm_metrics": str(tmp / "rm_metrics.csv")}
    out = tmp / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", "--model", str(tiny_policy[0]), "--out", str(out), "--files", json.dumps(files),
           "--engine", request.param]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return json.loads(out.read_text()), files, request.param


def assert_matches_one_process(r, steps):
    assert r["steps"] == steps, r
    assert r["rows_abs_diff"] < ATOL and r["rows_same_on_every_rank"], r  # loss (and accuracy) rows
    assert r["weights_max_abs_diff"] < ATOL, r
    assert r["weights_moved"] > 1e-4, r  # the updates did something to compare


@pytest.mark.distributed
def test_sft_on_two_ranks_matches_one_process(two_ranks):
    """3 steps, uneven shares and filler micro-batches included (see SFT_KW)."""
    r, _, _ = two_ranks
    assert r["world_size"] == 2
    assert_matches_one_process(r["sft"], 3)


@pytest.mark.distributed
def test_fsdp2_sft_saves_a_plain_folder_and_resumes_after_a_crash(two_ranks):
    r, _, engine = two_ranks
    if engine != "fsdp2":
        pytest.skip("FSDP2's gathered save and sharded checkpoint")
    s = r["sft"]
    # the gathered folder holds every weight of the one-process run, in the loaded dtype
    assert s["saved_names_missing"] == [] and s["saved_dtype"] == "torch.float32", s
    assert s["saved_max_abs_diff"] < ATOL, s
    assert s["checkpointed_step"] == 2, s  # the crash came after step 2's checkpoint, before step 3
    assert s["updates_after_resume"] == 1, s  # the rerun resumed: it ran step 3 only
    assert s["resumed_rows_abs_diff"] < ATOL and s["resumed_weights_max_abs_diff"] < ATOL, s


@pytest.mark.distributed
def test_reward_model_on_two_ranks_matches_one_process(two_ranks):
    r, _, _ = two_ranks
    assert_matches_one_process(r["rm"], 2)  # 3 pairs a step: 2 and 1
    assert_matches_one_process(r["rm_filler"], 2)  # 1 pair a step: rank 1 a zero-weighted filler


@pytest.mark.distributed
def test_scripts_on_ranks_write_their_outputs_once_on_rank_0(two_ranks):
    import pandas as pd

    from r1flow.models import load_policy
    from r1flow.models.reward_model import load_reward_model

    r, files, engine = two_ranks
    # per script: the model folder saved and the metrics written once, both by rank 0; under FSDP2 every
    # rank calls save_policy (the weights are gathered from all), which writes on rank 0 only
    rank1_saves = 2 if engine == "fsdp2" else 0
    assert r["scripts"]["calls_by_rank"] == [{"save": 2, "write": 2}, {"save": rank1_saves, "write": 0}]
    model, tok = load_policy(files["sft_out"])
    assert tok.chat_template  # the chat model the script writes
    assert pd.read_csv(files["sft_metrics"])["step"].tolist() == [1, 2, 3]
    load_reward_model(files["rm_out"])
    assert pd.read_csv(files["rm_metrics"])["step"].tolist() == [1, 2]


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, str(ROOT))  # r1flow, when not pip-installed
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--files", required=True)
    ap.add_argument("--engine", choices=sorted(ENGINES), required=True)
    worker(ap.parse_args())
