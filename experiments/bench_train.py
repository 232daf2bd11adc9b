"""Training-step throughput: r1jax's jitted SFT step against HF transformers + torch eager.

Why: every laptop ablation, the test suite and the embedded default train on CPU, so the
CPU step must not waste the machine. Both sides start from the same weights (r1jax writes an
HF checkpoint with `r1jax.model.hf.save_checkpoint`, transformers loads it) and run the same
step on the same batch: next-token loss over every position, backward, global-norm
clipping, AdamW. r1jax runs `r1jax.train.sft.make_train_step` for every MoE dispatch of
--impls and every attention path of --attention; HF runs eager PyTorch with whichever torch
thread count (1 or the default) is faster here. With more than one core, the --data_mesh
dispatches also run data-parallel over one host device per core (parameters replicated,
the batch split), as a config with mesh {'data': -1} trains.

Shapes (--shapes):
  'v3_small'  hidden 256, 4 layers (first dense), 4 heads, q-LoRA 128, kv-LoRA 64, nope 32,
              rope 16, v 32, dense FFN 1024, 16 routed experts of 128 + 1 shared, top-4 in 4
              groups keep 2, vocab 4096 (8.4M parameters), batch 8 x 256;
  'r1_tiny'   the embedded default's model (configs/r1_tiny.py, its tokenizer's vocabulary)
              at its SFT batch, 16 x 128.

    python experiments/bench_train.py [--out experiments/results/bench_train.json]
        [--shapes v3_small,r1_tiny] [--impls dense,ragged,grouped]
        [--attention naive,absorbed] [--data_mesh grouped] [--repeats 7] [--no_hf]

tokens/s = batch * seq / median seconds of one step (compile and a warm-up step excluded;
the sides are timed interleaved, so background load on a shared machine hits all alike);
the best step of each side is reported beside it (`vs_hf_best`), the steadier figure when the
machine's speed drifts within a run.
GFLOP/s uses `decoder.flops_per_token(cfg, seq)['train']` (3x the forward matmul and
attention FLOPs) against the machine's fp32 matmul ceiling measured in the same run.
Step 1's loss is reported for each side as a check that both train the same model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

# One host device per core for the data-mesh runs; must be set before jax is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={os.cpu_count()}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import bench_common  # noqa: E402
from r1jax import sharding  # noqa: E402
from r1jax.model import decoder, hf, presets  # noqa: E402
from r1jax.train import optim, sft  # noqa: E402

ADAMW = dict(lr=1e-3, b1=0.9, b2=0.95, weight_decay=0.01, grad_clip=1.0)


def shape_config(name: str):
  """(model config, batch, seq) of a named benchmark shape."""
  if name == "v3_small":
    cfg = presets.get("small", vocab_size=4096, q_lora_rank=128, intermediate_size=1024,
                      num_experts_per_tok=4, mtp_depth=0, max_position_embeddings=256)
    return cfg, 8, 256
  if name == "r1_tiny":
    return bench_common.experiment_model(os.path.join(REPO, "configs", "r1_tiny.py")), 16, 128
  raise ValueError(f"unknown shape {name!r}; known: v3_small, r1_tiny")


def r1jax_runner(cfg, params, tokens_BxL, mesh=None):
  """A closure running one SFT step (state updated in place, as the loop does) -> loss; with
  a mesh, parameters and batch placed as `sft.train` places them."""
  ocfg = optim.optimizer_defaults()
  ocfg.update(ADAMW)
  ocfg.warmup_steps = 0
  optimizer = optim.make_optimizer(ocfg, total_steps=1000)
  step = sft.make_train_step(cfg, optimizer, bias_rate=ocfg.router_bias_update_rate)
  b, l = tokens_BxL.shape
  batch = sharding.place_batch(
      {"tokens": tokens_BxL, "loss_mask": np.ones((b, l), bool),
       "segment_ids": np.ones((b, l), np.int32),
       "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l))}, mesh)
  params = sharding.place_params(jax.tree.map(jnp.array, params), cfg, mesh)
  state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
  box = [state]

  def run():
    box[0], metrics = step(box[0], batch)
    return float(jax.block_until_ready(metrics["loss"]))
  return run


def hf_runner(model, tokens_BxL, threads: int):
  import torch
  opt = torch.optim.AdamW(model.parameters(), lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]),
                          weight_decay=ADAMW["weight_decay"])
  ids = torch.as_tensor(tokens_BxL, dtype=torch.long)

  def run():
    torch.set_num_threads(threads)
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), ADAMW["grad_clip"])
    opt.step()
    return float(loss.detach())
  return run


def load_hf(cfg, params, tmp: str):
  import torch
  import transformers
  path = os.path.join(tmp, "hf")
  hf.save_checkpoint(cfg, jax.tree.map(np.asarray, params), path)
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  return model, {"torch": torch.__version__, "transformers": transformers.__version__,
                 "default_threads": torch.get_num_threads(),
                 "attn_implementation": model.config._attn_implementation}


def bench_shape(name: str, impls, attentions, repeats: int, with_hf: bool, ceiling: float,
                data_mesh_impls=()):
  cfg, b, l = shape_config(name)
  cfg = cfg.copy_and_resolve_references()
  params = decoder.init_params(cfg, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, l)).astype(np.int32)
  n_tok = b * l
  flops = decoder.flops_per_token(cfg, l)["train"] * n_tok
  out = {"shape": name, "batch": b, "seq": l, "params": decoder.count_params(cfg)["total"],
         "train_flops_per_step": flops, "runs": {}}
  print(f"{name}: {out['params'] / 1e6:.2f}M params, batch {b} x {l}", flush=True)
  runners = {}
  for attn in attentions:
    for impl in impls:
      variant = cfg.copy_and_resolve_references()
      variant.moe_impl, variant.attention_impl = impl, attn
      runners[f"r1jax_{impl}_{attn}"] = r1jax_runner(variant, params, tokens)
      n_dev = len(jax.devices())
      if impl in data_mesh_impls and n_dev > 1 and b % n_dev == 0:
        mesh = sharding.make_mesh({"data": n_dev})
        runners[f"r1jax_{impl}_{attn}_data_mesh_{n_dev}"] = r1jax_runner(variant, params, tokens,
                                                                        mesh)
  tmp = tempfile.mkdtemp(prefix="bench_train_")
  try:
    if with_hf:
      try:
        model, out["hf_versions"] = load_hf(cfg, params, tmp)
      except ImportError as e:
        print(f"HF baseline skipped: {e}")
        out["hf_skipped"] = str(e)
        model = None
      if model is not None:
        threads = {}
        for n in sorted({1, out["hf_versions"]["default_threads"]}):
          fn = hf_runner(model, tokens, n)
          fn()
          threads[n] = min(bench_common.seconds(fn) for _ in range(2))
        # the thread probe trained the model: reload so step 1's loss is comparable
        model, _ = load_hf(cfg, params, tmp)
        best = min(threads, key=threads.get)
        out["torch_threads"], out["torch_thread_probe_s"] = best, {str(k): v for k, v in threads.items()}
        runners["hf_eager"] = hf_runner(model, tokens, best)
    first = {}
    for key, fn in runners.items():  # compile + first step, not timed
      t0 = time.perf_counter()
      first[key] = fn()
      out["runs"][key] = {"first_call_s": time.perf_counter() - t0, "step1_loss": first[key]}
      fn()  # warm-up
    times = {key: [] for key in runners}
    for _ in range(repeats):
      for key, fn in runners.items():
        times[key].append(bench_common.seconds(fn))
    for key in runners:
      med = float(np.median(times[key]))
      out["runs"][key].update(seconds=times[key], median_s=med, tokens_per_s=n_tok / med,
                              tokens_per_s_best=n_tok / min(times[key]),
                              gflops_per_s=flops / med / 1e9,
                              fraction_of_matmul_ceiling=flops / med / ceiling)
    if "hf_eager" in runners:
      hf = out["runs"]["hf_eager"]
      for key in runners:
        r = out["runs"][key]
        r["vs_hf"] = r["tokens_per_s"] / hf["tokens_per_s"]
        r["vs_hf_best"] = r["tokens_per_s_best"] / hf["tokens_per_s_best"]
    for key, r in out["runs"].items():
      vs = f", {r['vs_hf']:.2f}x HF (best {r['vs_hf_best']:.2f}x)" if "vs_hf" in r else ""
      print(f"  {key:28s} {r['tokens_per_s']:8.0f} tok/s  {r['gflops_per_s']:6.1f} GFLOP/s "
            f"({100 * r['fraction_of_matmul_ceiling']:4.1f}% of ceiling){vs}  "
            f"step-1 loss {r['step1_loss']:.4f}", flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "results", "bench_train.json"))
  ap.add_argument("--shapes", default="v3_small,r1_tiny")
  ap.add_argument("--impls", default="dense,ragged,grouped")
  ap.add_argument("--attention", default="naive,absorbed")
  ap.add_argument("--data_mesh", default="grouped",
                  help="dispatches also run on a data mesh of one host device per core")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--no_hf", action="store_true", help="skip the HF transformers baseline")
  args = ap.parse_args(argv)
  if args.repeats < 1:
    ap.error("--repeats must be at least 1")
  ceiling = bench_common.matmul_ceiling()
  results = {"host": {"python": platform.python_version(), "jax": jax.__version__,
                      "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                      "devices": len(jax.devices()),
                      "machine": platform.machine()},
             "matmul_ceiling_gflops": ceiling / 1e9, "optimizer": ADAMW, "shapes": []}
  print(f"fp32 matmul ceiling {ceiling / 1e9:.1f} GFLOP/s", flush=True)
  for name in args.shapes.split(","):
    results["shapes"].append(bench_shape(name, args.impls.split(","), args.attention.split(","),
                                         args.repeats, not args.no_hf, ceiling,
                                         tuple(filter(None, args.data_mesh.split(",")))))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main()
