"""Countdown (the TinyZero task) on the miniature R1: cold-start SFT, then GRPO, on CPU.

  python -m r1jax.main --config=configs/countdown_tiny.py --workdir=/tmp/countdown_tiny
  python -m r1jax.main --config=configs/countdown_tiny.py:runlocal=True --workdir=/tmp/cd_quick

Reach a target in [1, 100] from 3-4 numbers in [1, 99] with + - * / and parentheses, every
number used exactly once (r1jax.tasks.countdown). The cold start sees `sft.num_traces` solver
traces (the steps, then the expression); GRPO trains on fresh problems rewarded by the
equation check only. Same model as configs/r1_tiny.py. Prompts reach 29 tokens and
cold-start sequences 80 with the char+words tokenizer, hence the lengths below.

Arguments: seed (int), runlocal (bool: a much shorter smoke run), mode (pipeline|sft|grpo|eval).
"""
from r1jax.model import presets
from r1jax.run import experiment


def get_config(arg=None):
  a = experiment.parse_arg(arg, seed=0, runlocal=False, mode="pipeline")
  c = experiment.base_config()
  c.mode = a.mode
  c.seed = a.seed
  c.rollout_mesh.data = -1  # one decode loop per host device (r1jax.main: one per core)

  experiment.set_task(c, "countdown", tokenizer="char+words", num_numbers=(3, 4),
                      number_range=(1, 99), target_range=(1, 100))

  c.model = presets.get(
      "tiny", hidden_size=128, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64,
      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
      intermediate_size=384, moe_intermediate_size=96, n_routed_experts=8, n_shared_experts=1,
      num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
      max_position_embeddings=128, moe_impl="grouped", attention_impl="naive", scan_layers=False)

  c.sft.num_traces = 2000
  c.sft.steps = 800
  c.sft.batch_size = 16
  c.sft.seq_len = 128
  c.sft.checkpoint_every = 400
  c.sft.optimizer.lr = 2e-3

  c.grpo.steps = 80
  c.grpo.prompts_per_step = 64
  c.grpo.G = 4
  c.grpo.dynamic_sampling = True
  c.grpo.max_prompt_len = 32
  c.grpo.max_new_tokens = 64
  c.grpo.optimizer.lr = 3e-4
  c.grpo.checkpoint_every = 20

  c.eval.num_problems = 256
  c.eval.max_new_tokens = 64

  if a.runlocal:
    c.sft.steps, c.sft.num_traces, c.grpo.steps = 30, 64, 4
    c.grpo.prompts_per_step, c.eval.num_problems = 8, 32
  return c
