"""`r1_zero` mode: the R1-Zero recipe at small scale (DeepSeek-AI 2025, section 2.2).

  1. pre-train a base model from random init on plain task text (`pretrain` mode's stage:
     the task's problems never in the template or the <think>/<answer> tags, no worked
     traces; a task option may mix in tagged documents about other content, as
     configs/r1_zero_tiny.py does, standing in for the web text a real base model saw);
  2. held-out accuracy and format rate of that base model (`eval_pretrain`);
  3. GRPO straight from it, no SFT, with rule-based rewards (the config's `grpo.rewards`,
     accuracy + format for R1-Zero) on prompts whose template states the tag format;
  4. held-out accuracy and format rate after GRPO (`eval_grpo`).
Every stage checkpoints and records its result in workdir/stages.json under a fingerprint of
the config fields it reads (`plan`, r1jax/run/stages.py, as the pipeline does), so a killed
run restarts where it stopped and a rerun with a changed field recomputes what depends on it. The end writes
workdir/summary.json (accuracy and format rate before/after, the per-step GRPO curves of
format rate, rewards and accuracy, wall times) and r1_zero.png.
"""
from __future__ import annotations

import json
import os
import time

from r1jax.run import experiment, pipeline, pretrain
from r1jax.run import stages as stages_lib
from r1jax.train import metrics as metrics_lib
from r1jax.train import rl

# GRPO metrics kept in the summary as (step, value) lists, when the run logged them.
CURVE_KEYS = ("format_rate", "reward_format", "reward_accuracy", "accuracy", "reward_mean")
PLOT_KEYS = ("format_rate", "reward_format", "reward_accuracy", "accuracy")
_MODEL = pipeline.MODEL_FIELDS


def plan(cfg) -> tuple[stages_lib.Stage, ...]:
  """The R1-Zero stages, the config fields each reads and the stages each uses."""
  Stage = stages_lib.Stage
  return (Stage("pretrain", _MODEL + ("pretrain",), run_dir="pretrain"),
          Stage("eval_pretrain", _MODEL + ("eval",), after=("pretrain",), run_dir="eval_pretrain"),
          Stage("grpo", _MODEL + ("grpo",), after=("pretrain",), run_dir="grpo"),
          Stage("eval_grpo", _MODEL + ("eval",), after=("grpo",), run_dir="eval_grpo"))


def run(cfg, workdir: str) -> dict:
  """`r1_zero` mode (see the module docstring)."""
  t_start = time.time()
  task, tokenizer, model_cfg, book, counts = pipeline.start(cfg, workdir, plan(cfg))
  mesh, rollout_mesh = experiment.mesh_of(cfg), experiment.rollout_mesh_of(cfg)
  evaluate = lambda name, step, params: pipeline.eval_stage(
      book, name, step, workdir, params, model_cfg, task, tokenizer, cfg.eval, cfg.seed,
      rollout_mesh)
  # -------------------------------------------------------------------- 1. pre-training
  params_pre, pre_info = pipeline.train_stage(
      book, "pretrain", lambda: pretrain.train(cfg, workdir, task, tokenizer, model_cfg, mesh))
  pre_summary = pretrain.summarize(cfg, workdir, pre_info, model_cfg)
  before = evaluate("eval_pretrain", pre_info["steps"], params_pre)
  # -------------------------------------------------------------------- 2. GRPO
  params_grpo, grpo_info = pipeline.train_stage(book, "grpo", lambda: rl.train(
      model_cfg, cfg.grpo, workdir, task=task, tokenizer=tokenizer, params=params_pre,
      task_name=cfg.task.name, task_kwargs=cfg.task.kwargs.to_dict(), seed=cfg.seed,
      mesh=mesh, rollout_mesh=rollout_mesh))
  after = evaluate("eval_grpo", grpo_info["steps"], params_grpo)
  # -------------------------------------------------------------------- summary
  records = metrics_lib.read_metrics(os.path.join(workdir, "grpo"))
  curves = {k: metrics_lib.curve(records, k) for k in CURVE_KEYS}
  curves = {k: [list(p) for p in pts] for k, pts in curves.items() if pts}
  wall = book.wall_time_s + (time.time() - t_start)
  split = {k: grpo_info[k] for k in ("sample_s", "verify_s", "train_s")}
  summary = {
      "task": cfg.task.name, "seed": cfg.seed, "template": task.template,
      "params_total": counts["total"], "params_activated": counts["activated"],
      "reward_weights": rl.reward_weights(cfg.grpo, task), "reward_mode": cfg.grpo.reward_mode,
      "pretrain_steps": pre_info["steps"], "pretrain_final_nll": pre_summary["final_nll"],
      "accuracy_before_grpo": before["pass@1"], "accuracy_after_grpo": after["pass@1"],
      "format_rate_before_grpo": before["format_rate"],
      "format_rate_after_grpo": after["format_rate"],
      "grpo_steps": grpo_info["steps"], "grpo_curves": curves,
      "pretrain_time_s": pre_info["train_time_s"], "grpo_time_s": sum(split.values()),
      "grpo_time_split_s": split, "wall_time_s": wall,
  }
  book.wall_time_s = wall
  book.save()
  metrics_lib.write_summary(workdir, summary)
  plot(workdir, summary)
  metrics_lib.log_hparams(workdir, cfg.to_dict(), summary)
  print(json.dumps({k: v for k, v in summary.items() if k != "grpo_curves"}, indent=2))
  return summary


def plot(workdir: str, summary: dict) -> str:
  """r1_zero.png: pre-training NLL; format rate, format and accuracy rewards and accuracy
  over GRPO steps; held-out accuracy and format rate before and after GRPO."""
  out = os.path.join(workdir, "r1_zero.png")
  if not metrics_lib.is_primary():  # process 0 draws
    return out
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(15, 4), dpi=100)
  FigureCanvasAgg(fig)
  ax1, ax2, ax3 = fig.subplots(1, 3)
  pts = metrics_lib.curve(metrics_lib.read_metrics(os.path.join(workdir, pretrain.STAGE)), "nll")
  if pts:
    ax1.plot(*zip(*pts))
  ax1.set_xlabel("pre-training step")
  ax1.set_ylabel("NLL / token (plain text)")
  ax1.set_yscale("log")
  for key in PLOT_KEYS:
    pts = summary["grpo_curves"].get(key)
    if pts:
      ax2.plot(*zip(*pts), label=key, marker=".")
  ax2.set_xlabel("GRPO step")
  ax2.set_ylim(-0.05, 1.05)
  ax2.legend()
  names = ["accuracy", "format rate"]
  before = [summary["accuracy_before_grpo"], summary["format_rate_before_grpo"]]
  after = [summary["accuracy_after_grpo"], summary["format_rate_after_grpo"]]
  xs = range(len(names))
  ax3.bar([x - 0.2 for x in xs], before, 0.4, label="pre-trained", color="tab:gray")
  ax3.bar([x + 0.2 for x in xs], after, 0.4, label="+ GRPO", color="tab:green")
  for x, (b, a) in enumerate(zip(before, after)):
    ax3.text(x - 0.2, b + 0.01, f"{b:.2f}", ha="center")
    ax3.text(x + 0.2, a + 0.01, f"{a:.2f}", ha="center")
  ax3.set_xticks(list(xs), names)
  ax3.set_ylim(0, 1.1)
  ax3.set_ylabel("held-out")
  ax3.legend()
  fig.tight_layout()
  fig.savefig(out)
  return out
