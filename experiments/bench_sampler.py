"""Rollout throughput: r1jax.rollout.sampler against HF transformers' generate on the same weights.

Why: GRPO spends a large share of its time sampling, so the rollout engine has to be fast on
the hardware people actually have. This measures, for the 'small' preset (no MTP module,
which generation never uses), generated tokens/s at batch 16 and 64 with 32-token prompts
and 128 new tokens, and the latent cache's bytes per token against a per-head MHA cache
for the same model. When torch and transformers are installed, it writes the weights with
`r1jax.model.hf.save_checkpoint`, loads them with `from_pretrained` and runs HF's greedy
`generate` (KV cache on) on the same prompts, side by side.

    python experiments/bench_sampler.py [--out experiments/results/bench_sampler.json]
        [--batches 16,64] [--prompt_len 32] [--new_tokens 128] [--repeats 3] [--no_hf]
        [--experiment configs/r1_tiny.py]  # that run's model instead of a preset

With more than one core, the greedy run is repeated with the batch split over a data mesh
of one host device per core (each shard an independent rollout), as GRPO's rollouts would
run on this machine, and over an expert mesh of the same devices (attention data-parallel,
each device holding 1/n of the routed experts, tokens exchanged at every MoE layer); both
must generate the one-device tokens. HF's side already uses every core it is faster with.

tokens/s = batch * new_tokens / wall seconds of one whole generate call (prefill
included, compile excluded: every program is run once before timing), best of --repeats
(medians are reported too); the sides are timed interleaved so background load on a
shared machine hits both alike, and HF runs with whichever torch thread count (1 or the
default) was faster on a short generate. Both sides are
greedy with no EOS, so both generate exactly new_tokens per row; `token_agreement` is the
fraction of generated tokens on which the two agree (a small random model has near-ties,
so this need not be 1).
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

# One host device per core for the data-mesh run; must be set before jax is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={os.cpu_count()}")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_common  # noqa: E402
from r1jax import sharding  # noqa: E402
from r1jax.model import decoder, hf, presets  # noqa: E402
from r1jax.rollout import sampler  # noqa: E402


def _summary(times: list[float], n_tokens: int) -> dict:
  return {"tokens_per_s": n_tokens / min(times), "tokens_per_s_median": n_tokens / float(np.median(times)),
          "seconds": times}


def r1jax_runner(cfg, params, prompts_BxP, new_tokens: int, mesh=None, **sampling):
  """One timed call = a GRPO step's rollout: the decode layout of the weights, then generate
  (the Sampler is built once per stage, the parameters placed once, as the loops do)."""
  engine = sampler.Sampler(cfg, mesh)
  if mesh is not None:
    params = sharding.place_params(params, cfg, mesh)
  def run():
    out = engine.generate(engine.prepare(params), prompts_BxP, jax.random.key(0),
                          max_new_tokens=new_tokens, **sampling)
    return np.asarray(jax.block_until_ready(out).tokens)
  return run


def hf_runner(hf_model, prompts_BxP, new_tokens: int, threads: int):
  import torch
  ids = torch.as_tensor(prompts_BxP, dtype=torch.long)
  kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                use_cache=True, attention_mask=torch.ones_like(ids), eos_token_id=None,
                pad_token_id=0)
  def run():
    torch.set_num_threads(threads)
    with torch.no_grad():
      return hf_model.generate(ids, **kwargs).numpy()
  return run


def pick_torch_threads(hf_model, prompts_BxP, candidates) -> tuple[int, dict]:
  """The torch thread count that runs a short generate fastest here, and every timing.

  On a shared 2-core machine torch's default (one OpenMP thread per core) can be ~20x
  slower than 1 thread when another process holds a core; HF gets its best setting.
  """
  timings = {}
  for n in candidates:
    fn = hf_runner(hf_model, prompts_BxP, 16, n)
    fn()
    timings[n] = min(_timed(fn)[0] for _ in range(2))
  return min(timings, key=timings.get), {str(k): v for k, v in timings.items()}


def load_hf(path: str):
  import torch
  import transformers
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  return hf_model.eval(), {"torch": torch.__version__, "transformers": transformers.__version__,
                           "torch_threads": torch.get_num_threads()}


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "results", "bench_sampler.json"))
  ap.add_argument("--batches", default="16,64")
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--preset", default="small")
  ap.add_argument("--experiment", default=None,
                  help="take the model from this experiment config file (e.g. "
                       "configs/r1_tiny.py: its model, its tokenizer's vocabulary) over --preset")
  ap.add_argument("--no_hf", action="store_true", help="skip the HF transformers baseline")
  args = ap.parse_args(argv)

  if args.experiment:
    cfg = bench_common.experiment_model(args.experiment)
    args.preset = os.path.relpath(args.experiment)
  else:
    cfg = presets.get(args.preset, mtp_depth=0)
  params = jax.device_put(decoder.init_params(cfg, jax.random.key(0)))
  n_params = decoder.count_params(cfg)["total"]
  cache = sampler.cache_bytes_per_token(cfg)
  v3 = sampler.cache_bytes_per_token(presets.get("deepseek_v3"))
  results = {
      "preset": args.preset, "params": n_params, "prompt_len": args.prompt_len,
      "new_tokens": args.new_tokens, "moe_impl": cfg.moe_impl,
      "cache_bytes_per_token": {"mla_latent": cache["latent"], "per_head_mha": cache["mha"],
                                "mha_over_mla": cache["ratio"],
                                "deepseek_v3_bf16": {"mla_latent": v3["latent"],
                                                     "per_head_mha": v3["mha"],
                                                     "mha_over_mla": v3["ratio"]}},
      "host": {"python": platform.python_version(), "jax": jax.__version__,
               "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
               "devices": len(jax.devices())},
      "runs": []}
  print(f"{args.preset}: {n_params / 1e6:.2f}M params; cache bytes/token: MLA latent "
        f"{cache['latent']} vs per-head MHA {cache['mha']} ({cache['ratio']:.1f}x)")

  hf_dir = None
  if not args.no_hf:
    try:
      import torch  # noqa: F401
      import transformers  # noqa: F401
      hf_dir = tempfile.mkdtemp(prefix="bench_sampler_hf_")
      hf.save_checkpoint(cfg, jax.tree.map(np.asarray, params), hf_dir)
    except ImportError as e:
      print(f"HF baseline skipped: {e}")
      results["hf_skipped"] = str(e)

  hf_model = None
  if hf_dir:
    hf_model, results["hf_versions"] = load_hf(hf_dir)
    default_threads = results["hf_versions"]["torch_threads"]
  n_dev = len(jax.devices())
  mesh_kinds = []  # mesh axis name: the batch (data) or the routed experts (expert) split
  if n_dev > 1:
    mesh_kinds = ["data"] + (["expert"] if cfg.n_routed_experts % n_dev == 0 else [])
  meshes = {kind: sharding.make_mesh({kind: n_dev}) for kind in mesh_kinds}
  mesh_run = {kind: f"r1jax_greedy_{kind}_mesh_{n_dev}" for kind in mesh_kinds}
  rng = np.random.default_rng(0)
  for b in [int(x) for x in args.batches.split(",")]:
    prompts = rng.integers(2, cfg.vocab_size, (b, args.prompt_len)).astype(np.int32)
    n_tokens = b * args.new_tokens
    runners = {"r1jax_greedy": r1jax_runner(cfg, params, prompts, args.new_tokens, temperature=0.0),
               "r1jax_sampled_T1_top_p0.95": r1jax_runner(cfg, params, prompts, args.new_tokens,
                                                          temperature=1.0, top_p=0.95)}
    if b % n_dev == 0:
      for kind, mesh in meshes.items():
        runners[mesh_run[kind]] = r1jax_runner(cfg, params, prompts, args.new_tokens, mesh=mesh,
                                               temperature=0.0)
    on_mesh = [kind for kind in mesh_kinds if mesh_run[kind] in runners]
    run = {"batch": b}
    if hf_model is not None:
      threads, run["torch_threads_16_token_seconds"] = pick_torch_threads(
          hf_model, prompts, sorted({1, default_threads}))
      run["torch_threads"] = threads
      runners["hf_generate_greedy"] = hf_runner(hf_model, prompts, args.new_tokens, threads)
    tokens, times = {}, {name: [] for name in runners}
    for name, fn in runners.items():  # first calls: compile / warm-up, not timed
      run.setdefault("first_call_seconds", {})[name], tokens[name] = _timed(fn)
    for _ in range(args.repeats):  # interleaved, so a busy machine slows every side alike
      for name, fn in runners.items():
        times[name].append(_timed(fn)[0])
    for name in runners:
      run[name] = _summary(times[name], n_tokens)
    line = (f"batch {b:3d}: r1jax greedy {run['r1jax_greedy']['tokens_per_s']:7.0f} tok/s, "
            f"sampled {run['r1jax_sampled_T1_top_p0.95']['tokens_per_s']:7.0f} tok/s")
    for kind in on_mesh:
      line += f", greedy on the {kind} mesh {run[mesh_run[kind]]['tokens_per_s']:7.0f} tok/s"
      if not np.array_equal(tokens[mesh_run[kind]], tokens["r1jax_greedy"]):
        raise AssertionError(f"the {kind}-mesh rollout generated other tokens than one device")
    if hf_model is not None:
      ours, theirs = run["r1jax_greedy"], run["hf_generate_greedy"]
      run["speedup_vs_hf"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
      run["speedup_vs_hf_median"] = ours["tokens_per_s_median"] / theirs["tokens_per_s_median"]
      gen_ours = tokens["r1jax_greedy"][:, args.prompt_len:]
      gen_hf = tokens["hf_generate_greedy"][:, args.prompt_len:]
      run["token_agreement"] = float(np.mean(gen_ours == gen_hf))
      line += (f" | HF generate {theirs['tokens_per_s']:6.0f} tok/s | {run['speedup_vs_hf']:.1f}x "
               f"(medians {run['speedup_vs_hf_median']:.1f}x), tokens agree "
               f"{run['token_agreement']:.3f}")
      for kind in on_mesh:
        ratio = run[mesh_run[kind]]["tokens_per_s"] / theirs["tokens_per_s"]
        run[f"speedup_vs_hf_{kind}_mesh"] = ratio
        line += f"; {kind} mesh {ratio:.1f}x"
    print(line, flush=True)
    results["runs"].append(run)

  if hf_dir:
    shutil.rmtree(hf_dir, ignore_errors=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")
  print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main()
