"""The miniature R1 recipe end to end: cold-start SFT, eval, GRPO, eval, and an SFT control.

  1. cold start: SFT on a LIMITED set of traces (`sft.num_traces`, R1 used thousands);
  2. held-out accuracy of that model (`accuracy_before_grpo`);
  3. GRPO from it on fresh problems that carry only a verifiable answer (no traces);
  4. control arm: the same cold-start model trained by more SFT on the same traces for the
     same training time GRPO took (its sampling + verifying + training seconds; on both
     sides compilation is not counted, so restarts change neither budget nor spending);
     both evaluated on the same held-out problems.
Every stage checkpoints and records its result in workdir/stages.json under a fingerprint of
the config fields it depends on (`plan`, r1jax/run/stages.py): a killed run restarts where it
stopped; a rerun with a changed field recomputes the stages that depend on it, from scratch
(their old run directories are moved aside), and reuses the others. The run writes
config.json first and ends with summary.json, pipeline.png and the config and summary in
TensorBoard (workdir/tb); each evaluation's figures go to TensorBoard as eval/... at the
step of the stage it follows (workdir/eval_sft/tb, ...).
"""
from __future__ import annotations

import json
import math
import os
import time

from r1jax.model import decoder
from r1jax.run import experiment
from r1jax.run import stages as stages_lib
from r1jax.train import evaluate as eval_lib
from r1jax.train import metrics as metrics_lib
from r1jax.train import rl, sft

MODEL_FIELDS = ("seed", "task", "model", "init_from_hf")  # every stage: data, model, keys


def plan(cfg) -> tuple[stages_lib.Stage, ...]:
  """The pipeline's stages, the config fields each reads and the stages each uses. The SFT
  control comes after GRPO because its time budget is GRPO's training time."""
  Stage = stages_lib.Stage
  out = [Stage("sft", MODEL_FIELDS + ("sft",), run_dir="sft"),
         Stage("eval_sft", MODEL_FIELDS + ("eval",), after=("sft",), run_dir="eval_sft"),
         Stage("grpo", MODEL_FIELDS + ("grpo",), after=("sft",), run_dir="grpo"),
         Stage("eval_grpo", MODEL_FIELDS + ("eval",), after=("grpo",), run_dir="eval_grpo")]
  if cfg.control:
    out += [Stage("sft_control", MODEL_FIELDS + ("sft",), after=("sft", "grpo"), run_dir="sft_control"),
            Stage("eval_sft_control", MODEL_FIELDS + ("eval",), after=("sft_control",),
                  run_dir="eval_sft_control")]
  return tuple(out)


def train_stage(book, name, train_fn, extra=None):
  """Runs (or resumes, or reloads the final checkpoint of) training stage `name` of `book`
  (train_fn() -> (params, info)); shared with the R1-Zero pipeline (r1jax/run/r1_zero.py)."""
  if book.result(name) is None:
    book.start(name)
  params, info = train_fn()
  book.finish(name, dict(info, **(extra or {})))
  return params, info


def eval_stage(book, name, step, workdir, params, model_cfg, task, tokenizer, ecfg, seed, mesh):
  """Held-out evaluation stage `name` of `book` (its recorded result when it holds), logged
  to TensorBoard at `step` of the stage it follows."""
  r = book.result(name)
  if r is None:
    book.start(name)
    r = eval_lib.evaluate(params, model_cfg, task, tokenizer, ecfg, seed=seed, mesh=mesh)
    metrics_lib.log_eval(os.path.join(workdir, name), step, r)
    book.finish(name, r)
  print(f"[{name}] held-out pass@1 {r['pass@1']:.3f}  format {r['format_rate']:.3f}")
  return r


def start(cfg, workdir: str, stage_plan):
  """The start of a multi-stage mode (this one, r1_zero): every check before any work
  (experiment.validate, and build's start-up checks: lengths, split sizes, vocab), then
  config.json and the stage book of `stage_plan`. Returns (task, tokenizer, model_cfg, book,
  parameter counts)."""
  experiment.validate(cfg)  # a bad field of any stage stops here, not after the first stage
  task, tokenizer, model_cfg = experiment.build(cfg)
  metrics_lib.write_config(workdir, cfg)
  book = stages_lib.Book(workdir, cfg, stage_plan)
  counts = decoder.count_params(model_cfg)
  print(f"model: {counts['total'] / 1e6:.2f}M parameters ({counts['activated'] / 1e6:.2f}M "
        f"activated), vocab {model_cfg.vocab_size}; task {cfg.task.name}")
  return task, tokenizer, model_cfg, book, counts


def run(cfg, workdir: str) -> dict:
  """`pipeline` mode (see the module docstring)."""
  t_start = time.time()
  task, tokenizer, model_cfg, book, counts = start(cfg, workdir, plan(cfg))

  mesh, rollout_mesh = experiment.mesh_of(cfg), experiment.rollout_mesh_of(cfg)
  params0 = experiment.initial_params(cfg, model_cfg, mesh)
  traces = experiment.sft_traces(cfg)
  evaluate = lambda name, step, params: eval_stage(book, name, step, workdir, params, model_cfg,
                                                  task, tokenizer, cfg.eval, cfg.seed,
                                                  rollout_mesh)
  # -------------------------------------------------------------------- 1. cold start
  params_sft, sft_info = train_stage(book, "sft", lambda: sft.train(
      model_cfg, cfg.sft, workdir, task=task, tokenizer=tokenizer, params=params0,
      examples=traces, seed=cfg.seed, name="sft", mesh=mesh))
  before = evaluate("eval_sft", sft_info["steps"], params_sft)
  # -------------------------------------------------------------------- 2. GRPO
  params_grpo, grpo_info = train_stage(book, "grpo", lambda: rl.train(
      model_cfg, cfg.grpo, workdir, task=task, tokenizer=tokenizer, params=params_sft,
      task_name=cfg.task.name, task_kwargs=cfg.task.kwargs.to_dict(), seed=cfg.seed,
      mesh=mesh, rollout_mesh=rollout_mesh))
  grpo_time = grpo_info["sample_s"] + grpo_info["verify_s"] + grpo_info["train_s"]
  after = evaluate("eval_grpo", grpo_info["steps"], params_grpo)
  # -------------------------------------------------------------------- 3. SFT control
  control = ctrl_info = None
  if cfg.control:
    per_step = sft_info["train_time_s"] / max(sft_info["steps"], 1)
    steps = max(1, math.ceil(1.5 * grpo_time / max(per_step, 1e-6)))
    params_ctrl, ctrl_info = train_stage(book, "sft_control", lambda: sft.train(
        model_cfg, cfg.sft, workdir, task=task, tokenizer=tokenizer, params=params_sft,
        examples=traces, seed=cfg.seed + 1, steps=steps, time_budget_s=grpo_time,
        name="sft_control", mesh=mesh), extra={"time_budget_s": grpo_time})
    control = evaluate("eval_sft_control", ctrl_info["steps"], params_ctrl)
  # -------------------------------------------------------------------- summary
  wall = book.wall_time_s + (time.time() - t_start)
  summary = {
      "task": cfg.task.name, "seed": cfg.seed, "num_traces": cfg.sft.num_traces,
      "params_total": counts["total"], "params_activated": counts["activated"],
      "accuracy_before_grpo": before["pass@1"], "accuracy_after_grpo": after["pass@1"],
      "accuracy_sft_control": control["pass@1"] if control else None,
      "grpo_lift": after["pass@1"] - before["pass@1"],
      "grpo_minus_control": (after["pass@1"] - control["pass@1"]) if control else None,
      "format_rate_after_grpo": after["format_rate"],
      "grpo_time_s": grpo_time, "grpo_time_split_s": {k: grpo_info[k] for k in
                                                      ("sample_s", "verify_s", "train_s")},
      "sft_time_s": sft_info["train_time_s"],
      "sft_control_time_s": ctrl_info["train_time_s"] if ctrl_info else None,
      "sft_control_steps": ctrl_info["steps"] if ctrl_info else None,
      "wall_time_s": wall,
  }
  book.wall_time_s = wall
  book.save()
  metrics_lib.write_summary(workdir, summary)
  plot(workdir, summary)
  metrics_lib.log_hparams(workdir, cfg.to_dict(), summary)
  print(json.dumps(summary, indent=2))
  return summary


def plot(workdir: str, summary: dict) -> str:
  """pipeline.png: SFT loss (cold start + control), GRPO reward, held-out accuracies."""
  out = os.path.join(workdir, "pipeline.png")
  if not metrics_lib.is_primary():  # process 0 draws
    return out
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(15, 4), dpi=100)
  FigureCanvasAgg(fig)
  ax1, ax2, ax3 = fig.subplots(1, 3)
  for name, label in (("sft", "cold-start SFT"), ("sft_control", "SFT control")):
    recs = metrics_lib.read_metrics(os.path.join(workdir, name)) if os.path.exists(
        os.path.join(workdir, name, metrics_lib.METRICS_FILE)) else []
    pts = metrics_lib.curve(recs, "nll", x="elapsed_s")
    if name == "sft_control" and pts:
      offset = summary["sft_time_s"]
      pts = [(t + offset, v) for t, v in pts]
    if pts:
      ax1.plot(*zip(*pts), label=label)
  ax1.set_xlabel("training seconds")
  ax1.set_ylabel("response NLL / token")
  ax1.set_yscale("log")
  ax1.legend()
  recs = metrics_lib.read_metrics(os.path.join(workdir, "grpo"))
  for key in ("reward_mean", "format_rate"):
    pts = metrics_lib.curve(recs, key)
    if pts:
      ax2.plot(*zip(*pts), label=key)
  ax2.set_xlabel("GRPO step")
  ax2.legend()
  names = ["SFT (cold start)", "+ GRPO", "+ more SFT\n(control)"]
  vals = [summary["accuracy_before_grpo"], summary["accuracy_after_grpo"],
          summary["accuracy_sft_control"] or 0.0]
  ax3.bar(names, vals, color=["tab:gray", "tab:green", "tab:orange"])
  for i, v in enumerate(vals):
    ax3.text(i, v + 0.01, f"{v:.2f}", ha="center")
  ax3.set_ylim(0, 1.05)
  ax3.set_ylabel("held-out accuracy")
  fig.tight_layout()
  fig.savefig(out)
  return out
