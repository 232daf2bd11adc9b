"""The miniature R1 pipeline shrunk until a whole run takes seconds: the tests' config.

  python -m r1jax.main --config=configs/test_tiny.py --workdir=/tmp/r1_test_tiny

Same stages and code paths as configs/r1_tiny.py (cold-start SFT, eval, GRPO, eval, SFT
control) on a 2-layer, hidden-32 DeepSeek-V3-shaped model with 4 routed experts in 2 groups.
The numbers it produces say nothing about learning; tests use it to check plumbing (files
written, checkpoints resumed, errors raised).

Arguments: seed (int), mode (pipeline|sft|grpo|eval), gsm8k (a GSM8K-style JSONL path: the
task becomes 'gsm8k' on that file for both splits, byte tokenizer, compact template and
lengths for its ~120-token prompts; empty = arithmetic).
"""
from __future__ import annotations

from r1jax.model import presets
from r1jax.run import experiment


def get_config(arg=None):
  a = experiment.parse_arg(arg, seed=0, mode="pipeline", gsm8k="")
  c = experiment.base_config()
  c.mode = a.mode
  c.seed = a.seed
  c.control = True

  if a.gsm8k:
    experiment.set_task(c, "gsm8k", tokenizer="byte", train_path=a.gsm8k, test_path=a.gsm8k,
                        template="compact")
  else:
    experiment.set_task(c, "arithmetic", tokenizer="char+words",
                        trace_overrides=dict(train_digits=(2, 2)),
                        ops=("+",), train_digits=(2, 3), test_digits=(3, 3), test_size=200)

  c.model = presets.get(
      "tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
      intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
      num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
      max_position_embeddings=64, moe_impl="dense", attention_impl="naive")

  c.sft.num_traces = 16
  c.sft.steps = 4
  c.sft.batch_size = 4
  c.sft.seq_len = 64
  c.sft.checkpoint_every = 2
  c.sft.optimizer.lr = 3e-3
  c.sft.optimizer.warmup_steps = 0

  c.grpo.steps = 2
  c.grpo.prompts_per_step = 4
  c.grpo.G = 4
  c.grpo.max_prompt_len = 16
  c.grpo.max_new_tokens = 24
  c.grpo.logprob_chunk = 256
  c.grpo.checkpoint_every = 1
  c.grpo.optimizer.lr = 1e-3
  c.grpo.optimizer.warmup_steps = 0

  c.eval.num_problems = 8
  c.eval.max_new_tokens = 24
  c.eval.batch_size = 8

  if a.gsm8k:  # byte-level prompts reach ~120 tokens and traces ~230 on the test fixture
    with open(a.gsm8k) as f:
      records = sum(1 for line in f if line.strip())
    c.model.max_position_embeddings = 256
    c.sft.seq_len, c.grpo.max_prompt_len = 256, 128
    c.sft.num_traces, c.eval.num_problems = min(16, records), min(8, records)
  return c
