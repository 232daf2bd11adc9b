"""Entry point: `python -m r1jax.main --config=configs/X.py[:arg] [--workdir=DIR] [--config.f=v]`.

Parses flags and dispatches on `config.mode` (`--config.mode=print_config` lists every field
of the config with its comment); all logic lives in library modules that tests and notebooks
import too.
"""
from __future__ import annotations

import os
import sys

# One host device per core, set before JAX is imported (an XLA_FLAGS that names a count is
# kept): on a CPU host, rollouts on a rollout mesh such as {'data': -1} then run one decode
# loop per core. Training without a mesh still runs on one device.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [
      os.environ.get("XLA_FLAGS", ""),
      f"--xla_force_host_platform_device_count={os.cpu_count() or 1}"]))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from r1jax.run import distill, evaluate, experiment, grpo, inspect_model, multihost  # noqa: E402
from r1jax.run import pipeline  # noqa: E402
from r1jax.run import pretrain, print_config, r1_zero, rejection_sample, sft  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (else "
    "R1JAX_COORDINATOR_ADDRESS; neither: automatic on Cloud TPU, else one process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-host: process count (else R1JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Multi-host: this process's id (else R1JAX_PROCESS_ID).")

MODES = {"inspect": inspect_model.run, "sft": sft.run, "grpo": grpo.run,
         "eval": evaluate.run, "pipeline": pipeline.run, "pretrain": pretrain.run,
         "r1_zero": r1_zero.run, "print_config": print_config.run,
         "rejection_sample": rejection_sample.run, "distill": distill.run}
NO_WORKDIR = ("inspect", "print_config")  # modes that write nothing unless given one


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep orbax's per-save INFO lines out of the progress bars
  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError("--config is required")
  if cfg.mode not in MODES:
    raise app.UsageError(f"config field 'mode' is {cfg.mode!r}; expected one of {sorted(MODES)}")
  if cfg.mode not in NO_WORKDIR and not _WORKDIR.value:
    raise app.UsageError(f"mode {cfg.mode!r} needs --workdir")
  try:  # before any JAX computation
    multihost.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  try:
    MODES[cfg.mode](cfg, _WORKDIR.value)  # every mode validates its whole config first
  except experiment.ConfigError as e:
    sys.exit(f"error: {e}")


def run_main(argv=None):
  """app.run(main) after rejecting `--config.FIELD` overrides of removed fields (with what
  replaced them) and of fields the config does not have (with the ones it has there)."""
  argv = sys.argv if argv is None else argv
  try:
    experiment.check_overrides(argv, experiment.config_from_argv(argv))
  except ValueError as e:
    sys.exit(f"error: {e}")
  app.run(main, argv=argv)


if __name__ == "__main__":
  run_main()
