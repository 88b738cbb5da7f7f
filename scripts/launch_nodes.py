"""Starts a training script on several nodes of a SLURM allocation: one torchrun per node through srun,
the first node of the allocation as the rendezvous host (the convention of open-r1's slurm/train.slurm and
of PyTorch's multi-node docs), WORLD_SIZE = nodes x nproc_per_node and RANK as torchrun sets them.

    launch_nodes.py --nodes N --nproc-per-node P [--cpus-per-task C] [--gpus-per-node G] -- SCRIPT ARGS...

Run in the job's batch step (the rule's resources carry `mpi`, so the SLURM executor runs the rule there
and not inside a one-task srun step). It starts `srun --nodes N --ntasks N --ntasks-per-node 1`, whose
tasks run this file again with --node: each finds its node's rank (SLURM_NODEID), the first host of the
step (scontrol show hostnames) and a port from the job id, and execs torchrun with a static rendezvous.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

PORT_BASE, PORT_SPAN = 20000, 20000


def rendezvous() -> tuple[str, int]:
    """The first host of the step's nodes and a port that every node computes alike (from the job id)."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        sys.exit("launch_nodes.py --node: no SLURM_STEP_NODELIST (not started by srun)")
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                           check=True).stdout.split()
    return hosts[0], PORT_BASE + int(os.environ["SLURM_JOB_ID"]) % PORT_SPAN


def torchrun_command(nodes: int, nproc: int, node_rank: int, host: str, port: int, script: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", str(nproc),
            "--node_rank", str(node_rank), "--master_addr", host, "--master_port", str(port), *script]


def srun_command(a, script: list[str]) -> list[str]:
    cmd = ["srun", "--nodes", str(a.nodes), "--ntasks", str(a.nodes), "--ntasks-per-node", "1",
           "--kill-on-bad-exit=1"]  # one failed node ends the step rather than leave the others waiting
    if a.cpus_per_task:
        cmd += ["--cpus-per-task", str(a.cpus_per_task)]
    if a.gpus_per_node:
        cmd += [f"--gpus-per-node={a.gpus_per_node}"]
    return cmd + [sys.executable, os.path.abspath(__file__), "--nodes", str(a.nodes), "--nproc-per-node",
                  str(a.nproc_per_node), "--node", "--", *script]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("launch_nodes.py: expected '-- SCRIPT ARGS...' after the options")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--nproc-per-node", type=int, required=True)
    ap.add_argument("--cpus-per-task", type=int, default=None)
    ap.add_argument("--gpus-per-node", type=int, default=None)
    ap.add_argument("--node", action="store_true", help="(internal) one node's task of the srun step")
    a = ap.parse_args(argv[:cut])
    script = argv[cut + 1:]
    if not a.node:
        if not os.environ.get("SLURM_JOB_ID"):
            sys.exit(f"launch_nodes.py: a job on {a.nodes} nodes runs inside a SLURM allocation (the SLURM "
                     "profile); here there is none (SLURM_JOB_ID unset)")
        print(f"launch_nodes.py: {a.nodes} nodes x {a.nproc_per_node} ranks: {' '.join(srun_command(a, script))}",
              flush=True)
        sys.exit(subprocess.run(srun_command(a, script)).returncode)
    host, port = rendezvous()
    node_rank = int(os.environ["SLURM_NODEID"])
    cmd = torchrun_command(a.nodes, a.nproc_per_node, node_rank, host, port, script)
    print(f"launch_nodes.py: node {node_rank} ({os.uname().nodename}), rendezvous {host}:{port}", flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
