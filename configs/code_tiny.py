"""The generated code task on the miniature R1: write small Python functions, rewarded by
unit tests run in the sandbox.

  python -m r1jax.main --config=configs/code_tiny.py --workdir=/tmp/code_tiny
  python -m r1jax.main --config=configs/code_tiny.py:runlocal=True --workdir=/tmp/code_quick

Problems come from r1jax.tasks.code_task (affine maps, counting, clipping, ...); the answer is
a ```python block whose function must pass every generated test, run by r1jax.verify.code
inside the bubblewrap sandbox (bwrap must be installed). `--config.grpo.reward_workers=N`
scores in N processes. Prompts reach 110 tokens and cold-start sequences 212 with the
char+words tokenizer, hence the lengths below.

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

  experiment.set_task(c, "code", tokenizer="char+words")

  c.model = presets.get(
      "tiny", hidden_size=128, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64,
      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
      intermediate_size=384, moe_intermediate_size=96, n_routed_experts=8, n_shared_experts=1,
      num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
      max_position_embeddings=256, moe_impl="grouped", attention_impl="naive", scan_layers=False)

  c.sft.num_traces = 2000
  c.sft.steps = 600
  c.sft.batch_size = 16
  c.sft.seq_len = 256
  c.sft.checkpoint_every = 200
  c.sft.optimizer.lr = 2e-3

  c.grpo.steps = 60
  c.grpo.prompts_per_step = 32
  c.grpo.G = 4
  c.grpo.max_prompt_len = 128
  c.grpo.max_new_tokens = 128
  c.grpo.optimizer.lr = 3e-4
  c.grpo.checkpoint_every = 20

  c.eval.num_problems = 128
  c.eval.max_new_tokens = 128

  if a.runlocal:
    c.sft.steps, c.sft.num_traces, c.grpo.steps = 20, 64, 2
    c.grpo.prompts_per_step, c.eval.num_problems = 4, 16
  return c
