"""The experiment assembly every mode shares: the config skeleton, config arguments, the
task, tokenizer and model config of a run, its mesh, its initial parameters (random or an HF
checkpoint), and restoring a stage's checkpoint.

Every run config (configs/*.py) starts from `base_config()`, so every optional field exists
with a default in every config and `--config.FIELD=value` can set it. Every mode calls
`validate` (the fields alone) and then `build`, which checks the data against the lengths
(`validate_run`): both before any work.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import math
import os

import jax
import ml_collections
import numpy as np
import pallas_kernels

from r1jax import sharding
from r1jax.data import datasets as data_lib
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.model import config as config_lib
from r1jax.model import decoder, hf, moe
from r1jax.tasks import base as task_base
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import evaluate as eval_lib
from r1jax.train import distill, optim, rl, sft

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


# ============================================================================ the skeleton


def mesh_defaults() -> ml_collections.ConfigDict:
  """One device count per mesh axis (sharding.MESH_AXES); all 1 = no mesh (one device)."""
  c = ml_collections.ConfigDict()
  c.data = 1     # pure data parallel; -1 = the devices the other axes leave
  c.fsdp = 1     # data parallel with parameters sharded ZeRO-3 style
  c.expert = 1   # routed experts split across devices
  c.tensor = 1   # heads and FFN hidden split across devices
  return c


def base_config() -> ml_collections.ConfigDict:
  """Every field a run config has, with its default; configs/*.py start from this and change
  what they need, so every config has the same fields."""
  c = ml_collections.ConfigDict()
  c.mode = "pipeline"               # pipeline | r1_zero | pretrain | sft | grpo | eval |
                                    # rejection_sample | distill | inspect | print_config
  c.seed = 0                        # parameters, data order and sampling
  c.control = True                  # pipeline: also train the SFT control arm for GRPO's time
  c.mesh = mesh_defaults()          # training mesh (axis sizes); all 1 = one device
  c.rollout_mesh = mesh_defaults()  # GRPO sampling and eval mesh; all 1 = the training mesh
  c.rollout_mesh_devices = "first"  # 'first': the rollout mesh takes the first devices (shared
                                    # with training); 'after_training': the devices after the
                                    # training mesh's (disjoint; all 1 = the one device after)
  c.init_from_hf = ""               # HF checkpoint dir every stage starts from ('' = random init)
  c.task = ml_collections.ConfigDict()
  c.task.name = "arithmetic"        # a registered task (r1jax.tasks.task_names())
  c.task.tokenizer = "auto"         # 'auto' | 'char' | 'char+words' | 'byte' (tokenizer.for_task)
  c.task.kwargs = task_kwargs_defaults("arithmetic")  # the task's options (set_task fills them)
  c.task.trace_overrides = ml_collections.ConfigDict()  # task options of the cold-start traces only
  c.model = config_lib.model_defaults()  # with init_from_hf only RUN_MODEL_FIELDS count
  c.pretrain = sft.pretrain_defaults()  # mode pretrain / r1_zero: plain task text, no template
  c.sft = sft.sft_defaults()
  c.grpo = rl.grpo_defaults()
  c.eval = eval_lib.eval_defaults()
  c.rejection = distill.rejection_defaults()  # mode rejection_sample: verified teacher traces
  c.distill = distill.distill_defaults()  # mode distill: SFT (+ token KL) of a student on them
  return c


def _task_class(name: str):
  if name not in task_base._REGISTRY:  # pylint: disable=protected-access
    raise ConfigError(f"config field 'task.name' is {name!r}; registered: "
                      f"{task_base.task_names()}")
  module, cls_name = task_base._REGISTRY[name].split(":")  # pylint: disable=protected-access
  return getattr(importlib.import_module(module), cls_name)


def task_options(name: str) -> dict:
  """The options of task `name` (its constructor's keyword arguments) -> default, None where
  it has none."""
  params = inspect.signature(_task_class(name).__init__).parameters
  return {k: (None if p.default is inspect.Parameter.empty else p.default)
          for k, p in params.items() if k != "self"}


def task_kwargs_defaults(name: str, **kwargs) -> ml_collections.ConfigDict:
  """task.kwargs for task `name`: every option with a default (None ones left out: a None
  field cannot be set from the command line), then `kwargs`."""
  options = task_options(name)
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    raise ValueError(f"task {name!r} has no option(s) {unknown}; its options: {sorted(options)}")
  out = {k: v for k, v in options.items() if v is not None}
  out.update(kwargs)
  return ml_collections.ConfigDict(out)


def set_task(c, name: str, tokenizer: str = "auto", trace_overrides=None, **kwargs) -> None:
  """Sets the config's task: name, tokenizer, kwargs (every option, see task_kwargs_defaults)
  and the options the cold-start traces change."""
  c.task.name = name
  c.task.tokenizer = tokenizer
  c.task.kwargs = task_kwargs_defaults(name, **kwargs)
  c.task.trace_overrides = ml_collections.ConfigDict(dict(trace_overrides or {}))


def _resolve_task_switch(cfg) -> None:
  """task.kwargs / trace_overrides written for another task (task.name was changed, e.g.
  `--config.task.name=countdown` on an arithmetic config) give way to the named task's
  defaults, with a note. An option no task has stays, and get_task names it."""
  name = cfg.task.name
  own = set(task_options(name))
  for field in ("kwargs", "trace_overrides"):
    keys = set(cfg.task[field].keys())
    foreign = sorted(keys - own)
    if not foreign:
      continue
    owners = [n for n in task_base.task_names() if n != name and keys <= set(_safe_options(n))]
    if not owners:
      continue
    print(f"note: task.{field} {sorted(keys)} are options of task {owners[0]!r}, not of "
          f"{name!r}: using the defaults of task {name!r}")
    cfg.task[field] = (task_kwargs_defaults(name) if field == "kwargs"
                       else ml_collections.ConfigDict())


def _safe_options(name):
  try:
    return task_options(name)
  except ImportError:  # a task whose optional dependency is missing (tfds)
    return {}


# ============================================================================ validation


def validate(cfg) -> None:
  """Checks every stage's config (sft, grpo, eval), the meshes, init_from_hf and the MoE
  dispatch for the devices, so that every mode stops before any work on a field no stage
  could use; ConfigError names the field. The checks that need the task's data and the
  model config run in `build` (validate_run)."""
  try:
    _validate(cfg)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _validate(cfg) -> None:
  try:
    mesh_of(cfg)
  except ValueError as e:
    raise ConfigError(f"config field 'mesh': {e}") from None
  rollout_mesh_of(cfg)  # ConfigError naming rollout_mesh or rollout_mesh_devices
  _task_class(cfg.task.name)  # an unknown task name stops here, naming the field
  if cfg.init_from_hf and not os.path.isfile(os.path.join(cfg.init_from_hf, "config.json")):
    raise ConfigError(f"config field 'init_from_hf': no config.json in {cfg.init_from_hf!r} "
                      "(an HF checkpoint directory holds config.json and *.safetensors)")
  sft.validate(cfg.sft)
  rl.validate(cfg.grpo)
  eval_lib.validate(cfg.eval)
  sft.validate_pretrain(cfg.pretrain)
  distill.validate_rejection(cfg.rejection)
  distill.validate_distill(cfg.distill)
  if cfg.sft.traces_path and cfg.mode in TRACE_MODES and not os.path.isfile(
      cfg.sft.traces_path):
    raise ConfigError(f"config field 'sft.traces_path': no such file {cfg.sft.traces_path!r}")
  check_dispatch(cfg.model.moe_impl, training_devices(cfg))


def runnable_impls(devices) -> list[str]:
  """The registered MoE dispatches (moe.DISPATCH_IMPLS) that run on these devices, and
  'auto'. 'pallas' runs compiled on one TPU or GPU only: on CPU its kernels only run
  interpreted (slowly, and not under every transform the steps use), and XLA cannot
  partition a Pallas kernel inside a jit over a multi-device mesh (moe.auto_impl)."""
  devices = list(devices)
  out = []
  for name in sorted(moe.DISPATCH_IMPLS):
    if name == "pallas" and (pallas_kernels.interpret_for(devices) or len(devices) > 1):
      continue
    out.append(name)
  return out + ["auto"]


def check_dispatch(impl: str, devices) -> None:
  """ConfigError naming model.moe_impl when `impl` cannot run on `devices`."""
  ok = runnable_impls(devices)
  if impl in moe.DISPATCH_IMPLS and impl not in ok:
    platforms = sorted({d.platform for d in devices})
    raise ConfigError(f"config field 'model.moe_impl' is {impl!r}, which cannot run on "
                      f"{len(devices)} {'/'.join(platforms)} device(s) of the training mesh; "
                      f"these can: {', '.join(ok)}")


def validate_run(cfg, task, tokenizer, model_cfg) -> None:
  """The checks that need the task's data and the model config, cheap enough for start-up:

  the tokenizer's vocab fits the model's (rollouts sample only the tokenizer's ids); sft.seq_len,
  and prompt + max_new_tokens of GRPO and eval, fit model.max_position_embeddings; the
  longest prompt of a sample of the train split (the first 256 examples, or all of a smaller
  source) fits grpo.max_prompt_len; the longest held-out prompt + eval.max_new_tokens fits
  the model's positions; the longest cold-start trace (prompt + trace + <eos>) fits
  sft.seq_len; the splits hold sft.num_traces and eval.num_problems examples. ConfigError
  names the field.
  """
  if tokenizer.vocab_size > model_cfg.vocab_size:
    where = (f"the checkpoint in init_from_hf={cfg.init_from_hf!r} has vocab_size "
             f"{model_cfg.vocab_size}" if cfg.init_from_hf else
             f"model.vocab_size is {model_cfg.vocab_size}")
    raise ConfigError(f"config field 'task.tokenizer' ({cfg.task.tokenizer!r}) gives a "
                      f"vocabulary of {tokenizer.vocab_size} tokens, but {where}: ids past it "
                      "would be clamped silently; pick a tokenizer that fits")
  max_pos = model_cfg.max_position_embeddings
  if cfg.sft.seq_len > max_pos:
    raise ConfigError(f"config field 'sft.seq_len' ({cfg.sft.seq_len}) exceeds "
                      f"model.max_position_embeddings ({max_pos})")
  if cfg.mode in ("pretrain", "r1_zero") and cfg.pretrain.seq_len > max_pos:
    raise ConfigError(f"config field 'pretrain.seq_len' ({cfg.pretrain.seq_len}) exceeds "
                      f"model.max_position_embeddings ({max_pos})")
  width = cfg.grpo.max_prompt_len + cfg.grpo.max_new_tokens
  if width > max_pos:
    raise ConfigError(f"config fields 'grpo.max_prompt_len' + 'grpo.max_new_tokens' ({width}) "
                      f"exceed model.max_position_embeddings ({max_pos})")
  source = task.source("train", seed=cfg.seed)
  train = [source[i] for i in range(min(len(source), _SAMPLE))]
  longest, uid = _longest(task, train,
                          lambda ex: len(tokenizer.encode(task.prompt(ex), add_bos=True)))
  if longest > cfg.grpo.max_prompt_len:
    raise ConfigError(f"config field 'grpo.max_prompt_len' ({cfg.grpo.max_prompt_len}) is "
                      f"shorter than the train prompt {uid} ({longest} tokens with <bos>)")
  try:
    heldout = eval_lib.heldout_examples(task, cfg.eval)
  except ValueError as e:
    raise ConfigError(f"config field 'eval.num_problems': {e}") from None
  longest, uid = _longest(task, heldout,
                          lambda ex: len(tokenizer.encode(task.prompt(ex), add_bos=True)))
  if longest + cfg.eval.max_new_tokens > max_pos:
    raise ConfigError(f"config field 'eval.max_new_tokens' ({cfg.eval.max_new_tokens}) + the "
                      f"held-out prompt {uid} ({longest} tokens) exceed "
                      f"model.max_position_embeddings ({max_pos})")
  if cfg.mode == "rejection_sample":
    _validate_rejection_run(cfg, task, tokenizer, model_cfg, train)
  what = "cold-start trace"
  if cfg.sft.traces_path and cfg.mode in TRACE_MODES:
    sample, what = sft_traces(cfg)[:_SAMPLE], f"trace of {cfg.sft.traces_path}"
  else:
    traces = (trace_task(cfg).source("train", seed=cfg.seed) if cfg.task.trace_overrides
              else source)
    if cfg.sft.num_traces > len(traces):
      raise ConfigError(f"config field 'sft.num_traces' ({cfg.sft.num_traces}) exceeds the "
                        f"{len(traces)} train examples of task {cfg.task.name!r}")
    n = min(cfg.sft.num_traces, _SAMPLE)  # the traces are the first num_traces train examples
    sample = train[:n] if traces is source else [traces[i] for i in range(n)]
  longest, uid = _longest(task, sample, lambda ex: len(data_lib.sft_sequence(task, ex,
                                                                             tokenizer)[0]))
  if longest > cfg.sft.seq_len:
    raise ConfigError(f"config field 'sft.seq_len' ({cfg.sft.seq_len}) is shorter than the "
                      f"{what} {uid} ({longest} tokens: prompt, trace and <eos>)")


# Modes whose SFT reads sft.traces_path when it is set.
TRACE_MODES = ("sft", "distill", "pipeline")


def _validate_rejection_run(cfg, task, tokenizer, model_cfg, train) -> None:
  """rejection.num_prompts within the train split; its prompts + max_new_tokens fit."""
  source = task.source("train", seed=cfg.seed)
  if cfg.rejection.num_prompts > len(source):
    raise ConfigError(f"config field 'rejection.num_prompts' ({cfg.rejection.num_prompts}) "
                      f"exceeds the {len(source)} train examples of task {cfg.task.name!r}")
  longest, uid = _longest(task, train[:cfg.rejection.num_prompts],
                          lambda ex: len(tokenizer.encode(task.prompt(ex), add_bos=True)))
  if longest + cfg.rejection.max_new_tokens > model_cfg.max_position_embeddings:
    raise ConfigError(f"config field 'rejection.max_new_tokens' "
                      f"({cfg.rejection.max_new_tokens}) + the train prompt {uid} ({longest} "
                      f"tokens) exceed model.max_position_embeddings "
                      f"({model_cfg.max_position_embeddings})")


def sft_traces(cfg) -> list:
  """The examples SFT trains on: the first sft.num_traces records of sft.traces_path when
  set (all of them when it holds fewer), else the first sft.num_traces train examples of the
  trace task (`trace_task`). ConfigError naming sft.traces_path for a file it cannot use."""
  if not cfg.sft.traces_path:
    return trace_task(cfg).examples("train", cfg.sft.num_traces, seed=cfg.seed)
  try:
    return sft.read_traces(cfg.sft.traces_path, cfg.sft.num_traces)
  except ValueError as e:
    raise ConfigError(f"config field 'sft.traces_path': {e}") from None


_SAMPLE = 256  # examples whose lengths validate_run measures per split


def _longest(task, examples, length) -> tuple[int, str]:
  """(the longest length(ex) over the first _SAMPLE examples, that example's uid)."""
  best, uid = 0, ""
  for i in range(min(len(examples), _SAMPLE)):
    ex = examples[i]
    n = length(ex)
    if n > best:
      best, uid = n, repr(ex.uid or f"{task.name} #{i}")
  return best, uid


# ============================================================================ config arguments


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


# ============================================================================ assembly

# Model fields that say how to run the model, not what it is: with init_from_hf they come
# from the run's config; every other model field comes from the checkpoint's config.json.
RUN_MODEL_FIELDS = ("attention_impl", "moe_impl", "pallas_backend", "pallas_tile_m",
                    "pallas_tile_k", "pallas_tile_n", "scan_layers", "param_dtype", "dtype",
                    "mtp_depth", "mtp_lambda", "seq_aux_alpha", "init_std")


def build(cfg):
  """(task, tokenizer, model_cfg) from an experiment config, checked by `validate_run`.

  Without init_from_hf the model is cfg.model with the vocab following the tokenizer; with
  it, the checkpoint's config.json with cfg.model's RUN_MODEL_FIELDS (mtp_depth: the MTP
  modules to load, 0 = none). moe_impl='auto' is resolved for the devices of the config's
  mesh (one device without one).
  """
  try:
    _resolve_task_switch(cfg)
    task = task_base.get_task(cfg.task.name, **cfg.task.kwargs.to_dict())
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(f"config field 'task.kwargs': {e}") from None
  try:
    tokenizer = tokenizer_lib.for_task(task, cfg.task.tokenizer)
  except ValueError as e:
    raise ConfigError(f"config field 'task.tokenizer': {e}") from None
  if cfg.init_from_hf:
    model_cfg = hf_model_config(cfg)
  else:
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.vocab_size = tokenizer.vocab_size
    try:
      config_lib.validate_model_config(model_cfg)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  model_cfg.moe_impl = moe.resolve_impl(model_cfg, training_devices(cfg))
  validate_run(cfg, task, tokenizer, model_cfg)
  return task, tokenizer, model_cfg


def hf_model_config(cfg):
  """The model config of the checkpoint in cfg.init_from_hf (its config.json) with the run's
  RUN_MODEL_FIELDS; ConfigError naming init_from_hf for a directory it cannot use."""
  try:
    hf_config = hf.read_config(cfg.init_from_hf)
    return hf.config_from_hf(hf_config, **{k: cfg.model[k] for k in RUN_MODEL_FIELDS})
  except ValueError as e:
    raise ConfigError(f"config field 'init_from_hf' ({cfg.init_from_hf!r}): {e}") from None


def _mesh_shape(shape) -> dict:
  """Axis sizes of a mesh field; {} for none (absent, empty or every axis 1)."""
  if not shape:
    return {}
  shape = shape.to_dict() if isinstance(shape, ml_collections.ConfigDict) else dict(shape)
  return {} if all(v == 1 for v in shape.values()) else shape


def _mesh(shape):
  """The mesh of a mesh field, or None; without a -1 axis it takes the first devices."""
  shape = _mesh_shape(shape)
  if not shape:
    return None
  devices = jax.devices()
  if -1 not in shape.values():
    n = math.prod(shape.values())
    if 0 < n <= len(devices):
      devices = devices[:n]
  return sharding.make_mesh(shape, devices)


def mesh_of(cfg):
  """The config's training mesh from `cfg.mesh` (axis sizes over data, fsdp, expert, tensor;
  one may be -1, see sharding.make_mesh), or None (every axis 1: one device)."""
  return _mesh(cfg.get("mesh"))


def training_devices(cfg) -> list:
  """The devices the training mesh spans (the first device without a mesh)."""
  mesh = mesh_of(cfg)
  return jax.devices()[:1] if mesh is None else list(np.asarray(mesh.devices).flat)


ROLLOUT_MESH_DEVICES = ("first", "after_training")


def rollout_mesh_of(cfg):
  """The mesh rollouts run on (GRPO's sampling, evaluation): `cfg.rollout_mesh` when any
  axis is not 1, else the training mesh (`mesh_of`). A rollout mesh of its own, e.g.
  data=-1 with training on one device, runs one rollout per device: on a CPU host (with one
  host device per core, as `r1jax.main` sets up) the decode loop's small ops then use every
  core, which one device's loop does not.

  cfg.rollout_mesh_devices='after_training' puts it on the devices after the training
  mesh's instead of the first ones (-1: all of them; every axis 1: the next device), so
  sampling and training hold disjoint devices (the weights are resharded device to device
  once per step, `sharding.transfer`). ConfigError naming the field when it cannot be built.
  """
  where = cfg.get("rollout_mesh_devices", "first")
  if where not in ROLLOUT_MESH_DEVICES:
    raise ConfigError(f"config field 'rollout_mesh_devices' is {where!r}; expected one of "
                      f"{', '.join(map(repr, ROLLOUT_MESH_DEVICES))}")
  if where == "first":
    try:
      mesh = _mesh(cfg.get("rollout_mesh"))
    except ValueError as e:
      raise ConfigError(f"config field 'rollout_mesh': {e}") from None
    return mesh_of(cfg) if mesh is None else mesh
  used = training_devices(cfg)
  free = [d for d in jax.devices() if d not in used]
  shape = _mesh_shape(cfg.get("rollout_mesh")) or {"data": 1}
  need = math.prod(v for v in shape.values() if v != -1)
  if not free or (-1 not in shape.values() and need > len(free)):
    raise ConfigError(
        f"config field 'rollout_mesh_devices' is 'after_training', but the training mesh "
        f"takes {len(used)} of the {len(jax.devices())} devices, leaving {len(free)} for a "
        f"rollout_mesh of {need} (set rollout_mesh / mesh smaller, or 'first' to share them)")
  try:
    return sharding.make_mesh(shape, free if -1 in shape.values() else free[:need])
  except ValueError as e:
    raise ConfigError(f"config field 'rollout_mesh' (on the {len(free)} devices after the "
                      f"training mesh's): {e}") from None


def trace_task(cfg):
  """The task the cold-start traces come from (task kwargs + task.trace_overrides)."""
  kwargs = {**cfg.task.kwargs.to_dict(), **cfg.task.trace_overrides.to_dict()}
  return task_base.get_task(cfg.task.name, **kwargs)


def initial_params(cfg, model_cfg, mesh=None):
  """The parameters every stage starts from without a checkpoint of its own: the HF
  checkpoint in cfg.init_from_hf (its safetensors, placed on the mesh), else a random init
  from cfg.seed; with a mesh initialised shape-first in place on the devices
  (`sharding.init_sharded_params`), so no host holds the whole set."""
  if cfg.init_from_hf:
    overrides = {k: model_cfg[k] for k in RUN_MODEL_FIELDS}
    try:
      _, params = hf.load_checkpoint(cfg.init_from_hf, **overrides)
    except ValueError as e:
      raise ConfigError(f"config field 'init_from_hf' ({cfg.init_from_hf!r}): {e}") from None
    print(f"loaded HF checkpoint {cfg.init_from_hf}")
    if mesh is None:
      return jax.tree.map(jax.numpy.asarray, params)
    return sharding.place_params(params, model_cfg, mesh)
  key = jax.random.key(cfg.seed)
  if mesh is None:
    return decoder.init_params(model_cfg, key)
  return sharding.init_sharded_params(model_cfg, key, mesh)


def params_to_evaluate(cfg, workdir: str, model_cfg):
  """The latest stage checkpoint in workdir (`latest_params`); without one, the HF
  checkpoint of cfg.init_from_hf when set (evaluating it as released)."""
  try:
    return latest_params(cfg, workdir, model_cfg)
  except ValueError:
    if not cfg.init_from_hf:
      raise
  return initial_params(cfg, model_cfg)


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
  pretrain one."""
  stages = [("grpo", cfg.grpo.optimizer, ("ref_params",)), ("sft", cfg.sft.optimizer, ()),
            ("pretrain", cfg.pretrain.optimizer, ())]
  for name, ocfg, extra in stages:
    params = restore_params(os.path.join(workdir, name), ocfg, model_cfg, extra)
    if params is not None:
      return params
  raise ValueError(f"no grpo, sft or pretrain checkpoint found under {workdir}")
