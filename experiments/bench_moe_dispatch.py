"""Grouped SwiGLU expert layer over expert-sorted rows: Pallas gmm vs lax.ragged_dot;
and the model's MoE dispatches (moe.dispatch_fn) end to end.

  python experiments/bench_moe_dispatch.py                      # CPU: scaled set, interpreted
  python experiments/bench_moe_dispatch.py --backend=gpu        # GPU: both sets, bf16
  python experiments/bench_moe_dispatch.py --tpu-topology=v5p:2x2x1   # AOT compile, no timing

Kernel level only: rows arrive sorted by expert with their group sizes (routing and the
gather/scatter around the layer are not timed). The layer is y = (silu(x Wg) * (x Wu)) Wd
per expert, so useful work is 6 m D F FLOPs forward and 18 m D F forward+backward.
Contenders: the Pallas kernels ('pallas_tpu' / 'pallas_gpu'), lax.ragged_dot ('ragged'),
every row through every expert ('dense_oracle', E times the work, scaled set only), and
one plain matmul [m, D] x [D, 3F] of the same useful FLOPs ('dense_matmul', the ceiling).
On CPU the Pallas kernels run interpreted: their times say nothing about speed there,
the run checks they agree with the reference.

Dispatch level (the JSON's 'dispatch_runs', not on --tpu-topology): the registered dispatches
'pallas', 'grouped', 'ragged', 'dense' as the model calls them, fn(experts, x, idx,
weights, cfg), on the scaled set: routing (top-K of skewed logits, some assignments
dropped as another shard's, expert index E), sort, gather, the expert layer and the
weighted combine; forward and forward+backward (d x, d weights) against 'dense' in
float32 (the exact oracle, E / K times the work); useful FLOPs count all T*K assignments,
dropped ones included. Writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import default_tiling, gmm, reference_gmm
from pallas_kernels.backends import fit_tiling
from r1jax.model import config as config_lib
from r1jax.model import moe
from r1jax.model.layers import fuse_swiglu

import bench_common

DISPATCHES = ("pallas", "grouped", "ragged", "dense")


@dataclasses.dataclass(frozen=True)
class Shapes:
  """T tokens x K experts each = m sorted rows; D model dim, F expert hidden, E experts."""
  T: int
  K: int
  D: int
  F: int
  E: int

  @property
  def m(self):
    return self.T * self.K


SETS = {
    "deepseek_v3": Shapes(T=8192, K=8, D=7168, F=2048, E=256),
    "scaled": Shapes(T=256, K=4, D=512, F=256, E=16),
}


def _group_sizes(s: Shapes, key):
  """Top-K of noisy skewed logits: uneven groups, some possibly empty."""
  skew = jnp.linspace(2.0, -2.0, s.E)
  logits = skew + jax.random.gumbel(key, (s.T, s.E))
  _, experts = jax.lax.top_k(logits, s.K)
  return jnp.bincount(experts.reshape(-1), length=s.E).astype(jnp.int32)


def _inputs(s: Shapes, dtype, key):
  k = jax.random.split(key, 6)
  scale_d, scale_f = s.D ** -0.5, s.F ** -0.5
  x = jax.random.normal(k[0], (s.m, s.D), dtype)
  w_gate = (jax.random.normal(k[1], (s.E, s.D, s.F)) * scale_d).astype(dtype)
  w_up = (jax.random.normal(k[2], (s.E, s.D, s.F)) * scale_d).astype(dtype)
  w_down = (jax.random.normal(k[3], (s.E, s.F, s.D)) * scale_f).astype(dtype)
  cot = jax.random.normal(k[4], (s.m, s.D), dtype)
  return (x, w_gate, w_up, w_down), _group_sizes(s, k[5]), cot


def _swiglu(mm, x, w_gate, w_up, w_down, group_sizes):
  h = jax.nn.silu(mm(x, w_gate, group_sizes)) * mm(x, w_up, group_sizes)
  return mm(h, w_down, group_sizes)


def _grouped_impls(kernels, interpret):
  impls = {}
  for backend in kernels:
    impls[f"pallas_{backend}"] = functools.partial(gmm, backend=backend, interpret=interpret)
  impls["ragged"] = jax.lax.ragged_dot
  impls["dense_oracle"] = reference_gmm
  return impls


def _fwd_bwd(fn):
  def run(args, group_sizes, cot):
    out, vjp = jax.vjp(lambda *a: fn(*a, group_sizes), *args)
    return out, vjp(cot)
  return run


def _dense_matmul(s: Shapes, dtype):
  """[m, D] x [D, 3F]: the useful FLOPs of the three expert matmuls in one matmul."""
  k = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(k[0], (s.m, s.D), dtype)
  w = (jax.random.normal(k[1], (s.D, 3 * s.F)) * s.D ** -0.5).astype(dtype)
  cot = jax.random.normal(k[2], (s.m, 3 * s.F), dtype)
  fwd = jax.jit(lambda x, w: x @ w)
  fwd_bwd = jax.jit(lambda x, w, c: jax.vjp(lambda x, w: x @ w, x, w)[1](c))
  return (fwd, (x, w)), (fwd_bwd, (x, w, cot))


def _tiling(backend, m, k, n, dtype):
  """The tiles gmm picks for an [m, k] x [k, n] product (tiling=None)."""
  return dataclasses.asdict(fit_tiling(default_tiling(backend, dtype), m, k, n, backend, dtype))


@jax.jit
def _max_rel_err(x, ref):
  """max |x - ref| over RMS(ref), on the device (the big set's arrays are GBs)."""
  x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
  return jnp.max(jnp.abs(x - ref)) / (jnp.sqrt(jnp.mean(ref ** 2)) + 1e-30)


def bench_set(name, s: Shapes, dtype, kernels, interpret, repeats, with_oracle):
  args, group_sizes, cot = _inputs(s, dtype, jax.random.PRNGKey(0))
  flops = {"forward": 6 * s.m * s.D * s.F, "forward_backward": 18 * s.m * s.D * s.F}
  impls = _grouped_impls(kernels, interpret)
  if with_oracle:
    # Every contender against the f32 jnp reference on the same (rounded) inputs.
    reference = "reference_gmm in float32"
    f32_args = [a.astype(jnp.float32) for a in args]
    ref = jax.jit(_fwd_bwd(functools.partial(_swiglu, reference_gmm)))(
        f32_args, group_sizes, cot.astype(jnp.float32))
  else:
    # Too big for the dense reference: compare with ragged_dot on the same inputs.
    reference, ref = "lax.ragged_dot on the same inputs", None
    impls.pop("dense_oracle")
    impls = {"ragged": impls.pop("ragged"), **impls}
  rows = []
  for impl, mm in impls.items():
    fwd = jax.jit(lambda a, g, mm=mm: _swiglu(mm, *a, g))
    fwd_bwd = jax.jit(_fwd_bwd(functools.partial(_swiglu, mm)))
    out, grads = fwd_bwd(args, group_sizes, cot)
    if ref is None:
      ref = (out, grads)
    err = max(float(_max_rel_err(a, b)) for a, b in zip((out, *grads), (ref[0], *ref[1])))
    del out, grads
    for pass_name, fn, fn_args in (("forward", fwd, (args, group_sizes)),
                                   ("forward_backward", fwd_bwd, (args, group_sizes, cot))):
      sec = bench_common.median_seconds(fn, *fn_args, repeats=repeats)
      rows.append({"impl": impl, "pass": pass_name, "seconds": sec,
                   "useful_tflops_per_s": flops[pass_name] / sec / 1e12,
                   "max_err_vs_reference_rms": err})
      print(f"{name:12s} {impl:14s} {pass_name:17s} {sec * 1e3:10.2f} ms "
            f"{flops[pass_name] / sec / 1e12:8.3f} TFLOP/s  err {err:.1e}", flush=True)
  (fwd, fwd_args), (fwd_bwd, bwd_args) = _dense_matmul(s, dtype)
  for pass_name, fn, fn_args in (("forward", fwd, fwd_args),
                                 ("forward_backward", fwd_bwd, bwd_args)):
    sec = bench_common.median_seconds(fn, *fn_args, repeats=repeats)
    rows.append({"impl": "dense_matmul", "pass": pass_name, "seconds": sec,
                 "useful_tflops_per_s": flops[pass_name] / sec / 1e12})
    print(f"{name:12s} {'dense_matmul':14s} {pass_name:17s} {sec * 1e3:10.2f} ms "
          f"{flops[pass_name] / sec / 1e12:8.3f} TFLOP/s", flush=True)
  tilings = {b: _tiling(b, s.m, s.D, s.F, dtype) for b in kernels}
  return {"shapes": dataclasses.asdict(s) | {"m": s.m}, "dtype": jnp.dtype(dtype).name,
          "error_reference": reference, "group_sizes": np.asarray(group_sizes).tolist(),
          "useful_flops": flops, "tiling_gate_up": tilings, "runs": rows}


def bench_dispatch(name, s: Shapes, dtype, pallas_backend, repeats, dropped=0.05):
  """The registered dispatches on set `s`, each against 'dense' (forward and gradients)."""
  cfg = config_lib.make_model_config(
      hidden_size=s.D, moe_intermediate_size=s.F, n_routed_experts=s.E, num_experts_per_tok=s.K,
      n_group=1, topk_group=1, dtype=jnp.dtype(dtype).name, pallas_backend=pallas_backend)
  k = jax.random.split(jax.random.PRNGKey(2), 5)
  (x, w_gate, w_up, w_down), _, _ = _inputs(Shapes(s.T, 1, s.D, s.F, s.E), dtype, k[0])
  experts = fuse_swiglu({"w_gate": w_gate, "w_up": w_up, "w_down": w_down})
  logits = jnp.linspace(2.0, -2.0, s.E) + jax.random.gumbel(k[1], (s.T, s.E))
  top_TxK, idx_TxK = jax.lax.top_k(logits, s.K)
  weights_TxK = jax.nn.softmax(top_TxK, axis=-1).astype(jnp.float32)
  idx_TxK = jnp.where(jax.random.uniform(k[2], idx_TxK.shape) < dropped, s.E, idx_TxK)
  cot = jax.random.normal(k[3], (s.T, s.D), dtype)
  flops = {"forward": 6 * s.m * s.D * s.F, "forward_backward": 18 * s.m * s.D * s.F}
  rows, ref = [], None
  for impl in ("dense",) + tuple(d for d in DISPATCHES if d != "dense"):
    fn = functools.partial(moe.dispatch_fn(impl), idx_TxK=idx_TxK, weights_TxK=weights_TxK,
                           cfg=cfg)
    fwd = jax.jit(lambda e, x, fn=fn: fn(e, x))
    fwd_bwd = jax.jit(lambda e, x, c, fn=fn: (lambda o, vjp: (o, vjp(c)))(
        *jax.vjp(lambda e, x: fn(e, x), e, x)))
    out, (d_experts, d_x) = fwd_bwd(experts, x, cot)
    got = (out, d_x, *jax.tree.leaves(d_experts))
    ref = got if ref is None else ref
    err = max(float(_max_rel_err(a, b)) for a, b in zip(got, ref))
    for pass_name, f, f_args in (("forward", fwd, (experts, x)),
                                 ("forward_backward", fwd_bwd, (experts, x, cot))):
      sec = bench_common.median_seconds(f, *f_args, repeats=repeats)
      rows.append({"impl": impl, "pass": pass_name, "seconds": sec,
                   "useful_tflops_per_s": flops[pass_name] / sec / 1e12,
                   "max_err_vs_dense_rms": err})
      print(f"{name:12s} dispatch {impl:8s} {pass_name:17s} {sec * 1e3:10.2f} ms "
            f"{flops[pass_name] / sec / 1e12:8.3f} TFLOP/s  err {err:.1e}", flush=True)
  return {"dropped_fraction": float(jnp.mean(idx_TxK == s.E)),
          "pallas_backend": pallas_backend, "error_reference": "moe_impl='dense'",
          "runs": rows}


def compile_for_topology(topology, sets, dtype):
  """AOT-compiles the layer's forward and forward+backward for one chip of `topology`."""
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  chip = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[:1]
  rep = NamedSharding(Mesh(np.array(chip), ("x",)), P())
  results = {}
  for name, s in sets.items():
    struct = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=rep)
    args = [struct((s.m, s.D)), struct((s.E, s.D, s.F)), struct((s.E, s.D, s.F)),
            struct((s.E, s.F, s.D))]
    sizes, cot = struct((s.E,), jnp.int32), struct((s.m, s.D))
    entry = {"shapes": dataclasses.asdict(s) | {"m": s.m}, "dtype": jnp.dtype(dtype).name,
             "tiling": {"gate_up": _tiling("tpu", s.m, s.D, s.F, dtype),
                        "down": _tiling("tpu", s.m, s.F, s.D, dtype)},
             "compiled": {}}
    for impl, mm in (("pallas_tpu", functools.partial(gmm, backend="tpu")),
                     ("ragged", jax.lax.ragged_dot)):
      for pass_name, fn, fn_args in (
          ("forward", lambda a, g, mm=mm: _swiglu(mm, *a, g), (args, sizes)),
          ("forward_backward", _fwd_bwd(functools.partial(_swiglu, mm)), (args, sizes, cot))):
        t = time.perf_counter()
        compiled = jax.jit(fn).lower(*fn_args).compile()
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        row = {k: int(getattr(mem, k)) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")}
        row["compile_seconds"] = time.perf_counter() - t
        row["xla_flops"] = float(cost.get("flops", -1)) if cost else None
        # XLA lowers ragged_dot on TPU to a custom call too, so this is set for both.
        row["has_tpu_custom_call"] = "tpu_custom_call" in compiled.as_text()
        entry["compiled"][f"{impl}/{pass_name}"] = row
        print(f"{topology} {name:12s} {impl:11s} {pass_name:17s} compiled in "
              f"{row['compile_seconds']:.1f}s  temp {row['temp_size_in_bytes'] / 2**20:.1f} MiB",
              flush=True)
    results[name] = entry
  return results


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--backend", choices=["cpu", "gpu"], default=None,
                 help="where to time (default: the default JAX backend)")
  p.add_argument("--tpu-topology", default=None,
                 help="AOT-compile for this TPU topology (e.g. v5p:2x2x1) instead of timing")
  p.add_argument("--sets", default=None, help="comma list of " + ",".join(SETS))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=None, help="JSON path (default: experiments/results/"
                 "bench_moe_dispatch.json, or bench_moe_dispatch_tpu_compile.json)")
  flags = p.parse_args()

  results = {"machine": f"{platform.machine()} {os.cpu_count()} cores",
             "jax": jax.__version__, "argv": sys.argv[1:]}
  if flags.tpu_topology:
    names = flags.sets.split(",") if flags.sets else list(SETS)
    results["tpu_topology"] = flags.tpu_topology
    results["tpu_compile"] = compile_for_topology(
        flags.tpu_topology, {n: SETS[n] for n in names}, jnp.bfloat16)
  else:
    backend = flags.backend or ("gpu" if jax.default_backend() == "gpu" else "cpu")
    results["devices"] = str(jax.devices()[0])
    if backend == "cpu":
      # CPU: interpreted kernels, f32, scaled set only; a correctness run, not a race.
      names = flags.sets.split(",") if flags.sets else ["scaled"]
      kernels, interpret, dtype = ("tpu", "gpu"), True, jnp.float32
    else:
      names = flags.sets.split(",") if flags.sets else ["scaled", "deepseek_v3"]
      kernels, interpret, dtype = ("gpu",), False, jnp.bfloat16
    results["backend"] = backend
    results["sets"] = {
        n: bench_set(n, SETS[n], dtype, kernels, interpret, flags.repeats,
                     with_oracle=(n == "scaled")) for n in names}
    # Dispatch level, scaled set ('pallas' with the TPU kernel interpreted on CPU).
    results["dispatch_runs"] = bench_dispatch(
        "scaled", SETS["scaled"], dtype, "auto", flags.repeats)
  out = flags.out or os.path.join("experiments", "results", "bench_moe_dispatch" + (
      "_tpu_compile" if flags.tpu_topology else "") + ".json")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(results, f, indent=2)
  print("wrote", out)


if __name__ == "__main__":
  main()
