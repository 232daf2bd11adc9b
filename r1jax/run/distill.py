"""`distill` mode (DeepSeek-R1 section 2.4): trains the run's `model` (the student, e.g. a
dense Qwen2 / Llama config; from init_from_hf or random) by SFT on a teacher's traces,
sft.traces_path (default: distill.teacher_workdir/rejection/traces.jsonl, which
rejection_sample writes), plus the token KL to the teacher of distill.kl when not 'none'
(r1jax.train.distill). The teacher is the latest checkpoint of distill.teacher_workdir (with
the model its config.json records, distill.teacher_model's fields over it) or the HF
checkpoint distill.teacher_from_hf. Writes workdir/config.json first and ends with
workdir/distill/summary.json and curves.png (loss, NLL, KL per step)."""
from __future__ import annotations

import copy
import json
import os
import time

from r1jax.model import config as config_lib
from r1jax.model import decoder, hf, moe
from r1jax.run import experiment
from r1jax.train import distill, metrics

CURVES = ("loss", "nll", "kl")


def _with_default_traces(cfg):
  """cfg, with sft.traces_path defaulting to the teacher workdir's rejection traces."""
  if cfg.sft.traces_path:
    return cfg
  if not cfg.distill.teacher_workdir:
    raise experiment.ConfigError("mode 'distill' trains on a teacher's traces: set config "
                                 "field 'sft.traces_path' (or 'distill.teacher_workdir', whose "
                                 "rejection/traces.jsonl is the default)")
  cfg = copy.deepcopy(cfg)
  cfg.sft.traces_path = os.path.join(cfg.distill.teacher_workdir, "rejection", "traces.jsonl")
  return cfg


def teacher(cfg, tokenizer):
  """(teacher model config, teacher params): the HF checkpoint distill.teacher_from_hf (with
  the run fields of distill.teacher_model, else of the run's model), or the latest checkpoint
  of distill.teacher_workdir with the model its config.json records, distill.teacher_model's
  fields over it and the vocab following the task's tokenizer (as `experiment.build`)."""
  dcfg = cfg.distill
  over = dcfg.teacher_model.to_dict()
  try:
    if dcfg.teacher_from_hf:
      run_fields = {k: over.get(k, cfg.model[k]) for k in experiment.RUN_MODEL_FIELDS}
      teacher_cfg, params = hf.load_checkpoint(dcfg.teacher_from_hf, **run_fields)
    else:
      path = os.path.join(dcfg.teacher_workdir, metrics.CONFIG_FILE)
      if not os.path.isfile(path) and not over:
        raise ValueError(f"no {path} records the teacher's model; set distill.teacher_model")
      recorded = json.load(open(path, encoding="utf-8")).get("model", {}) if os.path.isfile(
          path) else {}
      teacher_cfg = config_lib.model_defaults()
      teacher_cfg.update({**recorded, **over})
      teacher_cfg.vocab_size = tokenizer.vocab_size
      config_lib.validate_model_config(teacher_cfg)
      params = None
  except (ValueError, TypeError, KeyError) as e:
    field = "teacher_from_hf" if dcfg.teacher_from_hf else "teacher_model"
    raise experiment.ConfigError(f"config field 'distill.{field}': {e}") from None
  teacher_cfg.moe_impl = moe.resolve_impl(teacher_cfg, experiment.training_devices(cfg))
  if params is None:
    try:
      params = experiment.latest_params(cfg, dcfg.teacher_workdir, teacher_cfg)
    except ValueError as e:
      raise experiment.ConfigError(f"config field 'distill.teacher_workdir': {e}") from None
  return teacher_cfg, params


def run(cfg, workdir: str):
  experiment.validate(cfg)
  cfg = _with_default_traces(cfg)
  t_start = time.time()
  task, tokenizer, model_cfg = experiment.build(cfg)
  metrics.write_config(workdir, cfg)
  mesh = experiment.mesh_of(cfg)
  traces = experiment.sft_traces(cfg)
  teacher_cfg = teacher_params = None
  if cfg.distill.kl != "none":
    teacher_cfg, teacher_params = teacher(cfg, tokenizer)
  params = experiment.initial_params(cfg, model_cfg, mesh)
  params, info = distill.train(model_cfg, cfg.sft, cfg.distill, workdir, task=task,
                               tokenizer=tokenizer, params=params, traces=traces,
                               teacher_params=teacher_params, teacher_cfg=teacher_cfg,
                               seed=cfg.seed, mesh=mesh)
  counts = decoder.count_params(model_cfg)
  summary = {"task": cfg.task.name, "seed": cfg.seed, "num_traces": len(traces),
             "traces_path": cfg.sft.traces_path, "kl": cfg.distill.kl,
             "kl_weight": cfg.distill.kl_weight, "params_total": counts["total"],
             "params_activated": counts["activated"], **info,
             "wall_time_s": time.time() - t_start}
  if teacher_cfg is not None:
    teacher_counts = decoder.count_params(teacher_cfg)
    summary.update(teacher_params_total=teacher_counts["total"],
                   teacher_params_activated=teacher_counts["activated"])
  metrics.finish_run(os.path.join(workdir, "distill"), summary, config=cfg.to_dict(),
                     curves=CURVES)
  return params, info
