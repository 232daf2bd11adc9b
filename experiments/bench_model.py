"""Forward and forward+backward throughput of a model config under jit, with MFU.

  python experiments/bench_model.py --variant=small --batch=8 --seq=256 --moe_impl=dense,ragged

MFU is measured against this machine's fp32 matmul ceiling, measured in the same run (a
square jitted matmul), so the ratio is robust to a noisy, shared machine. Writes JSON.
"""
from __future__ import annotations

import json
import os
import platform

from absl import app, flags
import jax

from r1jax.train import losses

import bench_common

from r1jax.model import decoder, presets

_VARIANT = flags.DEFINE_string("variant", "small", "Model preset.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size.")
_SEQ = flags.DEFINE_integer("seq", 256, "Sequence length.")
_IMPLS = flags.DEFINE_list("moe_impl", ["dense", "ragged"], "MoE dispatch paths to time.")
_ATTN = flags.DEFINE_string("attention_impl", "naive", "Attention path.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (after one warm-up).")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_model.json", "JSON output path.")


def main(argv):
  del argv
  ceiling = bench_common.matmul_ceiling(2048)
  results = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].platform}",
             "jax": jax.__version__, "variant": _VARIANT.value, "batch": _BATCH.value,
             "seq": _SEQ.value, "attention_impl": _ATTN.value,
             "matmul_ceiling_gflops": ceiling / 1e9, "runs": []}
  print(f"fp32 matmul ceiling: {ceiling / 1e9:.1f} GFLOP/s")
  for impl in _IMPLS.value:
    cfg = presets.get(_VARIANT.value, moe_impl=impl, attention_impl=_ATTN.value,
                      dtype="float32", param_dtype="float32")
    params = decoder.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (_BATCH.value, _SEQ.value), 0, cfg.vocab_size)
    n_tok = _BATCH.value * _SEQ.value
    flops = decoder.flops_per_token(cfg, _SEQ.value)
    fwd = jax.jit(lambda p, t: decoder.forward(p, t, cfg)[0])
    def loss(p, t):
      s, n, _ = losses.lm_loss(p, t, cfg)
      return s / n
    fwd_bwd = jax.jit(jax.value_and_grad(loss))
    t_fwd = bench_common.median_seconds(fwd, params, tokens, repeats=_REPEATS.value)
    t_train = bench_common.median_seconds(fwd_bwd, params, tokens, repeats=_REPEATS.value)
    for name, sec, f in (("forward", t_fwd, flops["forward"]),
                         ("forward_backward", t_train, flops["train"])):
      run = {"moe_impl": impl, "pass": name, "seconds": sec, "tokens_per_s": n_tok / sec,
             "model_gflops_per_s": n_tok * f / sec / 1e9, "mfu": n_tok * f / sec / ceiling}
      results["runs"].append(run)
      print(f"{impl:7s} {name:16s} {run['tokens_per_s']:10.0f} tok/s  "
            f"{run['model_gflops_per_s']:7.1f} GFLOP/s  MFU {100 * run['mfu']:5.1f}%")
  counts = decoder.count_params(presets.get(_VARIANT.value))
  results["params"] = counts
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
