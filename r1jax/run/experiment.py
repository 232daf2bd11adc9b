"""The experiment assembly every mode shares: config arguments, the task, tokenizer and
model config of a run, its mesh, its initial parameters, and restoring a stage's checkpoint.

A run's config (configs/*.py) holds mode, seed, task, model, mesh and one sub-config per
stage (sft, grpo, eval); every mode calls `validate` first, and `build` validates the
model config.
"""
from __future__ import annotations

import copy
import importlib.util
import os

import jax
import ml_collections

from r1jax import sharding
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.model import config as config_lib
from r1jax.model import decoder, moe
from r1jax.tasks import base as task_base
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import evaluate as eval_lib
from r1jax.train import optim, rl, sft

# Config fields that no longer exist -> what replaced them (a command-line override of one
# stops at start-up with this message instead of a KeyError deep in the flag parser).
REPLACED_FIELDS = {
    "model.router_bias_update_rate": "sft.optimizer.router_bias_update_rate (and "
                                     "grpo.optimizer.router_bias_update_rate for RL)",
    "grpo.router_bias_update_rate": "grpo.optimizer.router_bias_update_rate",
    "eval.seed": "seed (the held-out problems are fixed for every run: "
                 "r1jax.train.evaluate.HELDOUT_SEED)",
    "sft.log_every": "nothing: SFT logs every step, read one step late",
}


def config_from_argv(argv):
  """The config `--config=PATH[:ARG]` in argv names, or None (absent, or it fails to load:
  then absl's own parsing reports the problem)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    path, _, config_arg = value.partition(":")
    try:
      spec = importlib.util.spec_from_file_location("r1jax_precheck_config", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      cfg = module.get_config(config_arg) if config_arg else module.get_config()
    except Exception:  # reported again, with absl's context, when app.run parses the flags
      return None
    return cfg if isinstance(cfg, ml_collections.ConfigDict) else None
  return None


def check_overrides(argv, cfg=None) -> None:
  """ValueError for any `--config.FIELD=...` in argv naming a field in REPLACED_FIELDS or,
  given the loaded config, a field that `cfg` does not have (with the fields it has there)."""
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    field = arg[len("--config."):].split("=", 1)[0]
    if field in REPLACED_FIELDS:
      raise ValueError(f"config field {field!r} was removed; use {REPLACED_FIELDS[field]}")
    if cfg is not None:
      _check_field_exists(cfg, field)


def _check_field_exists(cfg, field: str) -> None:
  node, parent = cfg, "config"
  for i, part in enumerate(field.split(".")):
    key = part.split("[", 1)[0]  # `a[0]` indexes a sequence field `a`
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      where = f"; known fields of {parent}: {', '.join(known)}" if known else \
          f"; {parent} has no sub-fields"
      raise ValueError(f"unknown config field {field!r}{where}")
    node, parent = node[key], ".".join(field.split(".")[:i + 1])


class ConfigError(ValueError):
  """A config field no stage can use; the message names it (main prints it, no traceback)."""


def validate(cfg) -> None:
  """Checks every stage's config (sft, grpo, eval) and the sequence lengths against the
  model's positions, so that every mode stops before any work on a field no stage could use;
  ConfigError names the field."""
  try:
    _validate(cfg)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _validate(cfg) -> None:
  for field in ("mesh", "rollout_mesh"):
    if cfg.get(field):
      try:
        sharding.make_mesh(dict(cfg[field]))
      except ValueError as e:
        raise ConfigError(f"config field {field!r}: {e}") from None
  sft.validate(cfg.sft)
  rl.validate(cfg.grpo)
  eval_lib.validate(cfg.eval)
  max_pos = cfg.model.max_position_embeddings
  if cfg.sft.seq_len > max_pos:
    raise ConfigError(f"config field 'sft.seq_len' ({cfg.sft.seq_len}) exceeds "
                     f"model.max_position_embeddings ({max_pos})")
  if "pretrain" in cfg:
    sft.validate_pretrain(cfg.pretrain)
    if cfg.pretrain.seq_len > max_pos:
      raise ConfigError(f"config field 'pretrain.seq_len' ({cfg.pretrain.seq_len}) exceeds "
                        f"model.max_position_embeddings ({max_pos})")
  width = cfg.grpo.max_prompt_len + cfg.grpo.max_new_tokens
  if width > max_pos:
    raise ConfigError(f"config fields 'grpo.max_prompt_len' + 'grpo.max_new_tokens' ({width}) "
                     f"exceed model.max_position_embeddings ({max_pos})")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a `get_config` argument like "variant=tiny,steps=10" (big_vision style).

  Values take the type of the default given for that key; unknown keys raise.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key!r} expects a bool, got {value!r}")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = kind(value)
  return out


def build(cfg):
  """(task, tokenizer, model_cfg) from an experiment config; the vocab follows the tokenizer.

  The model config is validated here, once per mode, and moe_impl='auto' is resolved for
  the devices of the config's mesh (one device without one).
  """
  task = task_base.get_task(cfg.task.name, **cfg.task.kwargs.to_dict())
  tokenizer = tokenizer_lib.for_task(task, cfg.task.tokenizer)
  model_cfg = copy.deepcopy(cfg.model)
  model_cfg.vocab_size = tokenizer.vocab_size
  config_lib.validate_model_config(model_cfg)
  mesh = mesh_of(cfg)
  # Without a mesh every step runs on one device.
  model_cfg.moe_impl = moe.resolve_impl(model_cfg, jax.devices()[:1] if mesh is None else mesh)
  return task, tokenizer, model_cfg


def mesh_of(cfg):
  """The config's device mesh from `cfg.mesh` (axis sizes, e.g. {'data': -1}; see
  sharding.make_mesh), or None (absent or empty: one device)."""
  shape = cfg.get("mesh")
  if not shape:
    return None
  return sharding.make_mesh(dict(shape))


def rollout_mesh_of(cfg):
  """The mesh rollouts run on (GRPO's sampling, evaluation): `cfg.rollout_mesh` when set,
  else the training mesh (`mesh_of`). A rollout mesh of its own, e.g. {'data': -1} with
  training on one device, runs one rollout per device: on a CPU host (with one host device
  per core, as `r1jax.main` sets up) the decode loop's small ops then use every core,
  which one device's loop does not."""
  shape = cfg.get("rollout_mesh")
  if not shape:
    return mesh_of(cfg)
  return sharding.make_mesh(dict(shape))


def trace_task(cfg):
  """The task the cold-start traces come from (task kwargs + task.trace_overrides)."""
  kwargs = {**cfg.task.kwargs.to_dict(), **cfg.task.trace_overrides.to_dict()}
  return task_base.get_task(cfg.task.name, **kwargs)


def init_params(model_cfg, seed: int, mesh=None):
  """Random initial parameters; with a mesh, initialised shape-first in place on the devices
  (`sharding.init_sharded_params`), so no host holds the whole set."""
  key = jax.random.key(seed)
  if mesh is None:
    return decoder.init_params(model_cfg, key)
  return sharding.init_sharded_params(model_cfg, key, mesh)


def restore_params(run_dir: str, optimizer_cfg, model_cfg, extra=()):
  """Parameters of the latest checkpoint under run_dir/checkpoints, or None if there is none.

  optimizer_cfg and extra (names of other parameter-shaped entries, e.g. 'ref_params')
  describe the saved state, so the restore knows every array's shape.
  """
  if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
    return None
  params = jax.eval_shape(lambda k: decoder.init_params(model_cfg, k), jax.random.key(0))
  opt = optim.make_optimizer(optimizer_cfg, 1)
  abstract = {"params": params, "opt_state": jax.eval_shape(opt.init, params),
              "step": jax.ShapeDtypeStruct((), jax.numpy.int32)}
  for k in extra:
    abstract[k] = params
  with ckpt_lib.CheckpointManager(run_dir) as manager:
    if manager.latest_step() is None:
      return None
    restored = manager.restore(abstract)
  name = os.path.basename(os.path.normpath(run_dir))
  print(f"loaded {name} checkpoint at step {restored.step} from {run_dir}")
  return restored.state["params"]


def latest_params(cfg, workdir: str, model_cfg):
  """Parameters of the latest GRPO checkpoint in workdir, else of the SFT one, else of the
  pretrain one (looked for when the config has a `pretrain` stage)."""
  stages = [("grpo", cfg.grpo.optimizer, ("ref_params",)), ("sft", cfg.sft.optimizer, ())]
  if "pretrain" in cfg:
    stages.append(("pretrain", cfg.pretrain.optimizer, ()))
  for name, ocfg, extra in stages:
    params = restore_params(os.path.join(workdir, name), ocfg, model_cfg, extra)
    if params is not None:
      return params
  names = "grpo, sft or pretrain" if "pretrain" in cfg else "sft or grpo"
  raise ValueError(f"no {names} checkpoint found under {workdir}")
