"""Shared by the entry points: argument helpers and logging set-up. No pipeline logic here."""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # r1flow, when not pip-installed


def json_arg(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None


def add_device(ap: argparse.ArgumentParser) -> None:
    """--device: the config's top-level `device` (auto | cpu | cuda | cuda:N), resolved by job_device()."""
    ap.add_argument("--device", default="auto",
                    help="where the models run: auto (CUDA when present, else CPU), cpu, cuda (the local rank's "
                         "GPU under torchrun) or cuda:N")


def add_tracking(ap: argparse.ArgumentParser) -> None:
    """--tracking: the job's tracking settings (r1flow.training.tracking; config `tracking`), absent by default."""
    ap.add_argument("--tracking", type=json_arg, default=None,
                    help='JSON {"backends": [tensorboard|wandb|trackio, ...], "run_name", "dir", "project"}: log '
                         "every metrics row there (default: no tracking)")


def job_settings(a: argparse.Namespace) -> dict:
    """The settings a job received (its arguments, without --tracking), as its tracking run records them."""
    return {k: v for k, v in vars(a).items() if k != "tracking"}


def job_device(setting: str):
    """The resolved device, before any model loads: CUDA asked on a host without it stops here, naming the
    config key."""
    from r1flow.models import resolve_device

    return resolve_device(setting)


def setup(threads: int | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        import torch

        torch.set_num_threads(threads)
