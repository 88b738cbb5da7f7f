"""Experiment tracking of the training stages (config `tracking`): TensorBoard, Weights & Biases, trackio.

    tracker = open_run(tracking, config, main=rank == 0)   # tracking: {"backends", "run_name", "dir", "project"}
    tracker.log(row, step)                                  # every metrics row the stage produces
    tracker.close()

`tracking` is what the workflow passes a training job (workflow/rules/common.smk, model_settings):
`backends`, a list of "tensorboard", "wandb" and "trackio" (several at once; empty or None: no tracking,
nothing imported, nothing written), the run's name (`<results folder>/<job>`), its folder
(results/tracking/<job>) and the project. `config` is recorded with the run (the settings the job
received). Everything is written locally, nothing is sent anywhere:

- tensorboard: event files in <dir>/tensorboard (torch.utils.tensorboard's SummaryWriter; the run name and
  config as a text summary), read by `tensorboard --logdir <dir>/tensorboard`;
- wandb: an offline run, <dir>/wandb/offline-run-*/run-*.wandb (mode "offline"), to upload later with
  `wandb sync`;
- trackio: its local SQLite store, <dir>/trackio/<project>.db (TRACKIO_DIR, set here when trackio is not
  imported yet; a process that imported it before writes to the store it chose then, named in `where`),
  read by `trackio show --project <project>` with that TRACKIO_DIR.

The packages are imported only when asked for; one asked for but not installed is a ConfigError naming
`tracking.backends`. Only the main rank logs (`main`): the rows are the same on every rank.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import numbers
import os
import sys
from pathlib import Path

from r1flow.config import ConfigError

log = logging.getLogger(__name__)

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # backend -> its package


def _scalars(row: dict) -> dict[str, float]:
    """The row's numeric values (NaN kept, as metrics.csv has it), without `step`."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, numbers.Real)}


def _jsonable(config: dict | None) -> dict:
    return json.loads(json.dumps(config or {}, default=str))


class Tracker:
    """One run logged to every backend asked for; a Tracker without backends does nothing."""

    def __init__(self, backends=(), run_name: str = "", directory: str | os.PathLike = ".", project: str = "r1flow",
                 config: dict | None = None):
        self.backends, self.run_name, self.project = list(backends), run_name, project
        self.dir, self.config = Path(directory), _jsonable(config)
        self.where: dict[str, str] = {}  # backend -> where it writes
        self._runs: dict = {}
        for name in self.backends:
            self._runs[name] = getattr(self, f"_open_{name}")()
        if self.backends:
            log.info("tracking run %s: %s", run_name, ", ".join(f"{k} -> {v}" for k, v in self.where.items()))

    # -- backends ------------------------------------------------------------------------------------
    def _open_tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        path = self.dir / "tensorboard"
        writer = SummaryWriter(log_dir=str(path))
        writer.add_text("run_name", self.run_name, 0)
        writer.add_text("config", "```\n" + json.dumps(self.config, indent=2, sort_keys=True) + "\n```", 0)
        self.where["tensorboard"] = str(path)
        return writer

    def _open_wandb(self):
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=self.project, name=self.run_name, config=self.config, dir=str(self.dir),
                         mode="offline", settings=wandb.Settings(silent=True, console="off", disable_git=True,
                                                 x_disable_stats=True))  # the metrics rows only
        self.where["wandb"] = str(Path(run.dir).parent)  # <dir>/wandb/offline-run-<time>-<id>
        return run

    def _open_trackio(self):
        store = self.dir / "trackio"
        if "trackio" not in sys.modules:
            os.environ["TRACKIO_DIR"] = str(store)
        import trackio
        from trackio import utils

        if Path(utils.TRACKIO_DIR).resolve() != store.resolve():
            log.warning("trackio was imported before with TRACKIO_DIR %s: run %s is stored there, not in %s",
                        utils.TRACKIO_DIR, self.run_name, store)
        run = trackio.init(project=self.project, name=self.run_name, config=self.config, embed=False,
                           auto_log_gpu=False, auto_log_cpu=False)
        self.where["trackio"] = str(utils.TRACKIO_DIR)
        return run

    # -- the interface -------------------------------------------------------------------------------
    def log(self, row: dict, step: int) -> None:
        if not self._runs:
            return
        values = _scalars(row)
        for name, run in self._runs.items():
            if name == "tensorboard":
                for k, v in values.items():
                    run.add_scalar(k, v, step)
            else:  # wandb and trackio: one row
                run.log(values, step=step)

    def close(self) -> None:
        for name, run in self._runs.items():
            if name == "tensorboard":
                run.flush()
                run.close()
            else:
                run.finish()
        self._runs = {}


def check_backends(backends) -> None:
    """Every backend is known and its package installed (ConfigError naming tracking.backends otherwise)."""
    for name in backends:
        if name not in BACKENDS:
            raise ConfigError(f"config key 'tracking.backends': unknown backend {name!r}; expected some of "
                              f"{sorted(BACKENDS)}")
        # found, not imported: trackio reads TRACKIO_DIR when first imported (Tracker._open_trackio)
        if importlib.util.find_spec(BACKENDS[name]) is None:
            raise ConfigError(f"config key 'tracking.backends': {name} is asked for, but its package "
                              f"{BACKENDS[name]!r} is not installed: pip install {BACKENDS[name]}, or drop "
                              f"{name} from tracking.backends")


def open_run(tracking: dict | None, config: dict | None = None, main: bool = True) -> Tracker:
    """A Tracker for the job's `tracking` settings; one that does nothing for None or no backends, and on
    a rank other than the main one (`main`)."""
    backends = list((tracking or {}).get("backends") or [])
    if not backends or not main:
        return Tracker()
    check_backends(backends)
    return Tracker(backends, run_name=tracking.get("run_name") or "r1flow", directory=tracking.get("dir") or ".",
                   project=tracking.get("project") or "r1flow", config=config)
