"""SFT step time on 8 host devices over several meshes, against one device; and the bytes
each MoE token exchange moves per step.

  python experiments/bench_sharding.py [--out experiments/results/bench_sharding.json]
      [--meshes 'data=8;data=2,fsdp=2,expert=2;fsdp=2,expert=4;data=2,expert=2,tensor=2']
      [--exchanges none] [--capacity_factor 1.25] [--repeats 5] [--batch 8] [--seq 128]

Why: the mesh is a config edit (r1jax/sharding.py), so every layout must at least run and
its cost be known. On one CPU, 8 host devices share the same cores: a mesh cannot be faster
than one device there, and the ratio (mesh step time / one-device step time) measures the
overhead of partitioning (collectives, resharding, smaller per-device ops), not speed-up.

Model: presets.get('small', mtp_depth=0): hidden 256, 4 layers (first dense, 3 MoE), 4 heads,
16 routed experts of 128 + 1 shared, top-2 in 4 groups keep 2, vocab 512 (6.3M parameters);
float32; one random batch (--batch x --seq), every position trained. The step is
`sft.make_train_step` (loss, grad, AdamW; global-norm clipping), jitted as the SFT loop jits
it, parameters placed by `sharding.place_params`, the batch by `place_batch`. Every mesh
uses the same MoE dispatch: cfg.moe_impl 'auto' resolved for the 8 devices (--impl to pick).
Time = median of --repeats steps after the compile and one warm-up step, the meshes timed
interleaved (background load hits all alike).

Collective bytes from the compiled program ('hlo_collectives'): each all-gather,
all-reduce, reduce-scatter, all-to-all and collective-permute of the compiled step, times
the trip count of the while loops around it (the layer scan), converted to bytes each
device sends with ring algorithms over a group of n: all-gather (n-1)/n * result,
reduce-scatter (n-1) * result, all-reduce 2 (n-1)/n * operand, all-to-all (n-1)/n *
operand, collective-permute the operand. With exchange 'none' this is the partitioner's
own communication (parameter all-gathers, gradient reductions, its MoE resharding). A check
of the count: on data=8 it comes close to one ring all-reduce of the float32 gradients,
2 * 7/8 * parameter bytes (printed under the table).

Exchange bytes ('exchange_bytes', from formulas, for every mesh with an 'expert' axis of
n > 1, whichever exchanges were timed): per device, per MoE layer, forward; a training step
moves twice that (each collective's transpose moves as much backward) in every MoE layer.
T_local = batch * seq / (data * fsdp * expert) tokens per device, T = n * T_local per
expert group, D hidden, b bytes per activation element, K experts per token.
  gather      all_gather of the group's tokens + psum_scatter of the partial outputs:
              2 * (n-1)/n * T * D * b
  all_to_all  dispatch + combine of fixed buffers of C rows per destination:
              2 * n * C * D * b, C = ceil(cf * T_local * K / n) (its own slot included)
  ragged      dispatch + combine of the rows actually routed to another device's experts:
              2 * rows * D * b, rows measured from the routing of the timed batch by the
              initialised model (per device; mean and max over devices)
--exchanges other than 'none' set cfg.moe_exchange (and cfg.moe_capacity_factor from
--capacity_factor) and time those runs too; a model config without those fields stops the
script with a message.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import re
import sys
import time

# 8 host devices, set before jax is imported (as tests/conftest.py does).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import bench_common  # noqa: E402
from r1jax import sharding  # noqa: E402
from r1jax.model import decoder, moe, presets  # noqa: E402
from r1jax.train import optim, sft  # noqa: E402

MESHES = "data=8;data=2,fsdp=2,expert=2;fsdp=2,expert=4;data=2,expert=2,tensor=2"
EXCHANGES = ("none", "gather", "all_to_all", "ragged")
ADAMW = dict(lr=1e-3, b1=0.9, b2=0.95, weight_decay=0.01, grad_clip=1.0)


def parse_mesh(text: str) -> dict:
  shape = {}
  for part in filter(None, text.split(",")):
    axis, _, size = part.partition("=")
    if axis not in sharding.MESH_AXES or not size.isdigit():
      raise ValueError(f"mesh {text!r}: expected axis=size over {sharding.MESH_AXES}")
    shape[axis] = int(size)
  return shape


def mesh_name(shape: dict) -> str:
  return ",".join(f"{a}={shape[a]}" for a in sharding.MESH_AXES if shape.get(a, 1) > 1) or "1"


# ---------------------------------------------------------------------------- HLO collectives

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f(?:16|32|64))\[([0-9,]*)\]")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(-start)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"(?:calls|body|to_apply|branch_computations|true_computation|"
                     r"false_computation)=\{?%?([\w.\-, %]+)\}?")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _shape_bytes(type_text: str) -> list[int]:
  return [_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
          for dt, dims in _SHAPE.findall(type_text)]


def _group_size(line: str, n_devices: int) -> int:
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if m:  # iota form [groups,size]<=[...]
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([^}]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  return n_devices


def hlo_collectives(text: str, n_devices: int) -> dict:
  """{kind: {'count', 'bytes_per_device'}} of a compiled program's collectives (module
  docstring), each counted as often as the while loops around it run."""
  comps: dict[str, list[str]] = {}
  entry, name = None, None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m and not line.startswith(" "):
      name = m.group(1)
      comps[name] = []
      if line.startswith("ENTRY"):
        entry = name
    elif name is not None:
      comps[name].append(line)
  calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
  for comp, lines in comps.items():
    for line in lines:
      trip = _TRIP.search(line)
      for group in _CALLEE.findall(line):
        for callee in re.split(r"[,\s%]+", group):
          if callee in comps:
            calls[comp].append((callee, int(trip.group(1)) if trip and " while(" in line else 1))
  times: dict[str, int] = collections.Counter()

  def visit(comp, k):
    times[comp] += k
    for callee, mult in calls[comp]:
      visit(callee, k * mult)
  visit(entry, 1)
  out = {}
  for comp, lines in comps.items():
    for line in lines:
      m = _COLLECTIVE.search(line)
      if not m or not times[comp]:
        continue
      kind, sizes = m.group(2), _shape_bytes(m.group(1))
      size = sizes[-1] if m.group(3) else sum(sizes)  # a -start's tuple ends in the result
      n = _group_size(line, n_devices)
      per_device = {"all-gather": (n - 1) / n * size, "reduce-scatter": (n - 1) * size,
                    "all-reduce": 2 * (n - 1) / n * size, "all-to-all": (n - 1) / n * size,
                    "collective-permute": size}[kind]
      row = out.setdefault(kind, {"count": 0, "bytes_per_device": 0.0})
      row["count"] += times[comp]
      row["bytes_per_device"] += times[comp] * per_device
  return out


# ---------------------------------------------------------------------------- exchange bytes

def batch_axes(mesh) -> tuple:
  spec = sharding.batch_sharding(mesh, 1).spec[0]
  return () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))


def routed_loads(params, cfg, tokens_BxL, shards: int):
  """tokens_per_expert [shards, MoE layers, E] of each batch shard's rows."""
  rows = tokens_BxL.reshape(shards, -1, tokens_BxL.shape[1])
  fn = jax.jit(jax.vmap(lambda t: decoder.forward(params, t, cfg)[1]["tokens_per_expert"]))
  return np.asarray(fn(rows))


def exchange_bytes(shape: dict, cfg, batch: int, seq: int, cf: float, load_fn) -> dict | None:
  """The module docstring's formulas for one mesh, or None without an expert axis."""
  n = shape.get("expert", 1)
  if n == 1:
    return None
  mesh = sharding.make_mesh(shape, jax.devices()[:math.prod(shape.values())])
  axes = batch_axes(mesh)
  shards = math.prod(mesh.shape[a] for a in axes)
  t_local = batch * seq // shards
  d, k, b = cfg.hidden_size, cfg.num_experts_per_tok, jnp.dtype(cfg.dtype).itemsize
  e, layers = cfg.n_routed_experts, cfg.num_hidden_layers - cfg.first_k_dense_replace
  loads = load_fn(shards)  # [shards, layers, E]
  rows = []  # per device: rows sent to other devices' experts, per layer (mean over layers)
  for coords in np.ndindex(*[mesh.shape[a] for a in sharding.MESH_AXES]):
    at = dict(zip(sharding.MESH_AXES, coords))
    shard = int(np.ravel_multi_index([at[a] for a in axes], [mesh.shape[a] for a in axes])) \
        if axes else 0
    own = slice(at["expert"] * e // n, (at["expert"] + 1) * e // n)
    sent = loads[shard].sum(-1) - loads[shard][:, own].sum(-1)
    rows.append(float(sent.mean()))
  c = math.ceil(cf * t_local * k / n)
  fwd = {"gather": 2 * (n - 1) / n * n * t_local * d * b,
         "all_to_all": 2 * n * c * d * b,
         "ragged": 2 * float(np.mean(rows)) * d * b}
  return {"n": n, "T_local": t_local, "T_group": n * t_local, "D": d, "K": k,
          "bytes_per_element": b, "capacity_factor": cf, "C": c, "moe_layers": layers,
          "ragged_rows_per_layer_mean": float(np.mean(rows)),
          "ragged_rows_per_layer_max": float(np.max(rows)),
          "ragged_rows_uniform": t_local * k * (n - 1) / n,
          "forward_per_layer": fwd,
          "ragged_forward_per_layer_max": 2 * float(np.max(rows)) * d * b,
          "per_step": {x: 2 * layers * v for x, v in fwd.items()}}


# ---------------------------------------------------------------------------- timing

def runner(cfg, params, tokens_BxL, mesh):
  """(run() -> loss, compiled step, compile seconds) of one SFT step on `mesh` (None: one
  device), state updated in place as the loop does."""
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
  state = {"params": params, "opt_state": optimizer.init(params),
           "step": jnp.zeros((), jnp.int32)}
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  box = [state]

  def run():
    box[0], metrics = compiled(box[0], batch)
    return float(jax.block_until_ready(metrics["loss"]))
  return run, compiled, compile_s


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "results", "bench_sharding.json"))
  ap.add_argument("--meshes", default=MESHES, help="';'-separated axis=size lists")
  ap.add_argument("--exchanges", default="none", help=f"','-separated, of {EXCHANGES}")
  ap.add_argument("--capacity_factor", type=float, default=1.25)
  ap.add_argument("--impl", default="", help="moe_impl (default: 'auto' for the 8 devices)")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  args = ap.parse_args(argv)
  exchanges = args.exchanges.split(",")
  if bad := [x for x in exchanges if x not in EXCHANGES]:
    ap.error(f"--exchanges: unknown {bad}; known: {EXCHANGES}")
  if args.repeats < 1:
    ap.error("--repeats must be at least 1")
  shapes = [parse_mesh(m) for m in args.meshes.split(";")]
  if (need := max(math.prod(s.values()) for s in shapes)) > len(jax.devices()):
    ap.error(f"a mesh needs {need} devices, have {len(jax.devices())}")

  cfg = presets.get("small", mtp_depth=0)
  cfg.moe_impl = args.impl or moe.resolve_impl(cfg, jax.devices())
  if any(x != "none" for x in exchanges) and "moe_exchange" not in cfg:
    sys.exit("--exchanges other than 'none' need the model config field moe_exchange "
             "(and moe_capacity_factor), which this r1jax does not have")
  params = decoder.init_params(cfg, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size,
                                             (args.batch, args.seq)).astype(np.int32)
  loads = {}

  def load_fn(shards):
    if shards not in loads:
      loads[shards] = routed_loads(params, cfg, tokens, shards)
    return loads[shards]

  results = {"host": {"python": platform.python_version(), "jax": jax.__version__,
                      "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                      "devices": len(jax.devices()), "machine": platform.machine()},
             "model": "presets.get('small', mtp_depth=0)", "moe_impl": cfg.moe_impl,
             "params": decoder.count_params(cfg)["total"],
             "param_bytes": sum(x.nbytes for x in jax.tree.leaves(params)), "batch": args.batch,
             "seq": args.seq, "optimizer": ADAMW, "repeats": args.repeats, "runs": []}
  print(f"small (mtp_depth 0): {results['params'] / 1e6:.2f}M params, batch {args.batch} x "
        f"{args.seq}, moe_impl {cfg.moe_impl}, {len(jax.devices())} devices", flush=True)
  runs = [("1", {}, "none")] + [(mesh_name(s), s, x) for s in shapes for x in exchanges
                                if x == "none" or s.get("expert", 1) > 1]
  runners = {}
  for name, shape, exchange in runs:
    variant = cfg.copy_and_resolve_references()
    if exchange != "none":
      variant.moe_exchange = exchange
      if "moe_capacity_factor" in variant:
        variant.moe_capacity_factor = args.capacity_factor
    n_dev = math.prod(shape.values()) if shape else 1
    mesh = sharding.make_mesh(shape, jax.devices()[:n_dev]) if shape else None
    run, compiled, compile_s = runner(variant, params, tokens, mesh)
    row = {"mesh": name, "shape": shape, "devices": n_dev, "exchange": exchange,
           "compile_s": compile_s, "step1_loss": run(),
           "hlo_collectives": hlo_collectives(compiled.as_text(), n_dev),
           "exchange_bytes": exchange_bytes(shape, cfg, args.batch, args.seq,
                                            args.capacity_factor, load_fn) if shape else None}
    run()  # warm-up
    runners[(name, exchange)] = run
    results["runs"].append(row)
    print(f"  compiled {name} ({exchange}) in {compile_s:.1f} s", flush=True)
  times = {key: [] for key in runners}
  for _ in range(args.repeats):
    for key, run in runners.items():
      times[key].append(bench_common.seconds(run))
  base = float(np.median(times[("1", "none")]))
  for row in results["runs"]:
    t = times[(row["mesh"], row["exchange"])]
    row.update(seconds=t, median_s=float(np.median(t)), vs_one_device=float(np.median(t)) / base)
    row["hlo_bytes_per_device"] = sum(v["bytes_per_device"]
                                      for v in row["hlo_collectives"].values())
  print_table(results)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {args.out}")
  return results


def print_table(results) -> None:
  mb = lambda x: f"{x / 2**20:8.2f}" if x is not None else "       -"
  print(f"\n{'mesh':26s} {'exchange':10s} {'step s':>7s} {'x 1 dev':>7s} "
        f"{'HLO MiB/dev':>11s}  {'gather':>8s} {'a2a':>8s} {'ragged':>8s}  (MiB/device/step; "
        "HLO: per compiled step, the rest from formulas)")
  for r in results["runs"]:
    ex = r["exchange_bytes"]
    per = ex["per_step"] if ex else {}
    kinds = ", ".join(f"{k} {v['count']}" for k, v in sorted(r["hlo_collectives"].items()))
    print(f"{r['mesh']:26s} {r['exchange']:10s} {r['median_s']:7.3f} {r['vs_one_device']:7.2f} "
          f"{r['hlo_bytes_per_device'] / 2**20:11.2f}  {mb(per.get('gather'))} "
          f"{mb(per.get('all_to_all'))} {mb(per.get('ragged'))}  step-1 loss "
          f"{r['step1_loss']:.4f}  [{kinds}]")
  print(f"(one ring all-reduce of the gradients over 8 devices: "
        f"{2 * 7 / 8 * results['param_bytes'] / 2**20:.2f} MiB/device)")


if __name__ == "__main__":
  main()
