"""`inspect` mode: what a model config costs, checked without allocating its weights."""
from __future__ import annotations

import json

import jax
import numpy as np

from r1jax.model import decoder


def describe(cfg) -> dict:
  """Parameter counts, FLOPs per token, the shape-only init, and a forward on the tiny twin."""
  counts = decoder.count_params(cfg.model)
  flops = decoder.flops_per_token(cfg.model, cfg.seq_len)
  shapes = jax.eval_shape(lambda k: decoder.init_params(cfg.model, k), jax.random.key(0))
  n_shape = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  twin = cfg.smoke_model
  params = decoder.init_params(twin, jax.random.key(cfg.seed))
  tokens = np.arange(2 * 8, dtype=np.int32).reshape(2, 8) % twin.vocab_size
  logits, aux = decoder.checked_forward(params, tokens, twin)
  return {
      "variant": cfg.variant,
      "params_total": counts["total"],
      "params_activated": counts["activated"],
      "params_embedding": counts["embedding"],
      "params_mtp": counts["mtp"],
      "params_in_shape_only_init": n_shape,
      "forward_flops_per_token": flops["forward"],
      "train_flops_per_token": flops["train"],
      "seq_len": cfg.seq_len,
      "smoke_variant": cfg.smoke_variant,
      "smoke_logits_shape": list(logits.shape),
      "smoke_logits_finite": bool(np.isfinite(np.asarray(logits)).all()),
      "smoke_tokens_per_expert": np.asarray(aux.get("tokens_per_expert", np.zeros(0))).tolist(),
  }


def run(cfg, workdir: str | None = None) -> dict:
  info = describe(cfg)
  print(f"{info['variant']}: {info['params_total'] / 1e9:.2f}B parameters "
        f"({info['params_activated'] / 1e9:.2f}B activated per token, embedding "
        f"{info['params_embedding'] / 1e9:.2f}B, MTP {info['params_mtp'] / 1e9:.2f}B extra)")
  print(f"  {info['forward_flops_per_token'] / 1e9:.2f} GFLOP/token forward at seq_len {info['seq_len']}")
  print(f"  tiny twin {info['smoke_variant']}: logits {info['smoke_logits_shape']}, "
        f"finite={info['smoke_logits_finite']}")
  if workdir:
    import os
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "model_info.json"), "w") as f:
      json.dump(info, f, indent=2)
  return info
