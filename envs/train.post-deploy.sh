#!/usr/bin/env bash
# Snakemake runs this after creating envs/train.yaml (--sdm conda). DeepSpeed compiles against the torch
# already in the env, so it is installed after it, without build isolation. NOT RUN here (see README).
set -euo pipefail
pip install --no-build-isolation "deepspeed==0.19.8"
