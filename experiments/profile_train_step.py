"""Where a training step's time goes: each part of the model timed alone, forward + backward.

Why: a whole-step number says how fast, not what to fix. This times, at one of
bench_train.py's shapes, the jitted value-and-gradient of every part a step runs (one
layer's attention, dense FFN, router, routed-expert dispatch for each --impls, shared
expert; the output head with the loss over the vocabulary; the optimizer update), scales
each by how many times a step runs it, and sets the sum beside the measured whole step.

    python experiments/profile_train_step.py [--shape v3_small] [--impls grouped,dense]
        [--attention naive,absorbed] [--repeats 7] [--out experiments/results/profile_train_step.json]

Each part's gradient is taken with respect to its input activations and its weights, with
a fixed random cotangent, so its backward does the work the full step's does.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
import bench_train  # noqa: E402
from r1jax.model import decoder, layers, mla, moe  # noqa: E402
from r1jax.train import losses, optim  # noqa: E402


def _vjp_timer(f, *args):
  """jit(grad of sum(f(*args) * c)) w.r.t. every floating argument, c a fixed random array."""
  out = jax.eval_shape(f, *args)
  cot = jax.tree.map(lambda s: jax.random.normal(jax.random.key(1), s.shape, s.dtype), out)

  def loss(*a):
    y = f(*a)
    return sum(jnp.vdot(yi, ci) for yi, ci in zip(jax.tree.leaves(y), jax.tree.leaves(cot)))
  float_args = tuple(i for i, a in enumerate(args)
                     if all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(a)))
  return jax.jit(jax.value_and_grad(loss, argnums=float_args))


def profile(shape: str, impls, attentions, repeats: int) -> dict:
  cfg, b, l = bench_train.shape_config(shape)
  cfg = cfg.copy_and_resolve_references()
  cfg.moe_impl, cfg.attention_impl = impls[0], attentions[0]  # the whole step's paths
  params = decoder.init_params(cfg, jax.random.key(0))
  t = b * l
  key = jax.random.key(2)
  x_BxLxD = jax.random.normal(key, (b, l, cfg.hidden_size), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  mask = decoder.attention_mask(positions, jnp.ones((b, l), jnp.int32))
  n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
  n_dense = cfg.first_k_dense_replace
  dense_p = jax.tree.map(lambda a: a[0], params["dense_layers"])
  moe_p = jax.tree.map(lambda a: a[0], params["moe_layers"])
  parts = {}

  def part(name: str, count: int, f, *args):
    """Records the median fwd+bwd seconds of f(*args), run `count` times per step."""
    parts[f"{name} (x{count})"] = (count, bench_common.median_seconds(_vjp_timer(f, *args), *args,
                                                                      repeats=repeats))

  for attn in attentions:
    part(f"attention_{attn}", cfg.num_hidden_layers,
         lambda p, x, attn=attn: mla.attention(mla.compute_layout(p, cfg), x, positions, mask,
                                               cfg, attn)[0], moe_p["attn"], x_BxLxD)
  ffn = lambda p, x: layers.swiglu(x, layers.fuse_swiglu(p))
  part("dense_ffn", n_dense, ffn, dense_p["mlp"], x_BxLxD)
  x_TxD = x_BxLxD.reshape(t, -1)
  part("router", n_moe, lambda p, x: moe.route(p, x, cfg)[1], moe_p["moe"]["router"], x_TxD)
  idx_TxK, w_TxK, _ = moe.route(moe_p["moe"]["router"], x_TxD, cfg)
  for impl in impls:
    fn = moe.dispatch_fn(impl)
    part(f"dispatch_{impl}", n_moe,
         lambda p, x, w, fn=fn: fn(layers.fuse_swiglu(p), x, idx_TxK, w, cfg),
         moe_p["moe"]["experts"], x_TxD, w_TxK)
  if "shared" in moe_p["moe"]:
    part("shared_expert", n_moe, ffn, moe_p["moe"]["shared"], x_TxD)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, l)), jnp.int32)
  head_p = {"lm_head": params["lm_head"], "final_norm": params["final_norm"]}

  def head_loss(p, h):
    logits = decoder._head({"lm_head": p["lm_head"], "embed": None}, h, p["final_norm"], cfg)
    return losses.cross_entropy_sum(logits[:, :-1], tokens[:, 1:], jnp.ones((b, l - 1)))[0]
  parts["head_and_loss (x1)"] = (1, bench_common.median_seconds(
      jax.jit(jax.value_and_grad(head_loss, (0, 1))), head_p, x_BxLxD, repeats=repeats))
  step_s = bench_common.median_seconds(bench_train.r1jax_runner(cfg, params, np.asarray(tokens)),
                                       repeats=repeats)
  ocfg = optim.optimizer_defaults()
  opt = optim.make_optimizer(ocfg, 1000)
  opt_state = opt.init(params)
  upd = jax.jit(lambda g, s, p: optim.apply_updates(p, opt.update(g, s, p)[0]))
  parts["optimizer (x1)"] = (1, bench_common.median_seconds(upd, params, opt_state, params,
                                                             repeats=repeats))
  out = {"shape": shape, "batch": b, "seq": l, "moe_impl": cfg.moe_impl,
         "attention_impl": cfg.attention_impl, "step_median_s": step_s,
         "parts": {}}
  print(f"{shape}: whole step ({cfg.moe_impl}, {cfg.attention_impl}) "
        f"{1e3 * out['step_median_s']:.1f} ms")
  for name, (count, sec) in parts.items():
    out["parts"][name] = {"count": count, "seconds_each": sec, "seconds_per_step": count * sec}
    print(f"  {name:32s} {1e3 * sec:8.2f} ms each, {1e3 * count * sec:8.1f} ms per step")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shape", default="v3_small")
  ap.add_argument("--impls", default="grouped,dense")
  ap.add_argument("--attention", default="naive,absorbed")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "results", "profile_train_step.json"))
  args = ap.parse_args(argv)
  res = profile(args.shape, args.impls.split(","), args.attention.split(","), args.repeats)
  res["host"] = {"python": platform.python_version(), "jax": jax.__version__,
                 "cpu_count": os.cpu_count()}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
