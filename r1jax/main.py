"""Entry point: `python -m r1jax.main --config=configs/X.py[:arg] [--workdir=DIR] [--config.f=v]`.

Parses flags and dispatches on `config.mode`; all logic lives in library modules that tests
and notebooks import too.
"""
from __future__ import annotations

import importlib

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")

# mode -> module whose run(config, workdir) does the work
MODES = {"inspect": "r1jax.model_info", "sft": "r1jax.sft", "grpo": "r1jax.rl",
         "eval": "r1jax.evaluate", "pipeline": "r1jax.pipeline"}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep orbax's per-save INFO lines out of the progress bars
  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError("--config is required")
  if cfg.mode not in MODES:
    raise app.UsageError(f"config field 'mode' is {cfg.mode!r}; expected one of {sorted(MODES)}")
  if cfg.mode != "inspect" and not _WORKDIR.value:
    raise app.UsageError(f"mode {cfg.mode!r} needs --workdir")
  importlib.import_module(MODES[cfg.mode]).run(cfg, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
