r"""Per-device memory of a training config on a mesh, before paying for the machines.

    sft-jax-plan --config configs/gpt2_alpaca.py --devices 64 \
        --config.mesh.fsdp=16 --config.mesh.tensor=4

Parameters and optimizer state are exact: shapes from `jax.eval_shape` of the real init,
each leaf divided by the mesh axes its sharding rule splits it over (the same rules and
divisibility fallback as training). Activations are an estimate from the model's shapes
(what the backward pass keeps per layer, plus the logits); `--compile` instead compiles the
real train step on faked CPU devices and reports XLA's own temp-buffer figure.

`--lower tpu` (or `cuda`) lowers the real train step for that platform on `--devices`
faked CPU devices with the config's mesh and the kernels that platform would run (TPU:
splash attention inside shard_map): a config that will not partition fails here, on a
laptop, with the lowering error and a non-zero exit, before the pod is paid for.

    sft-jax-plan --config configs/X.py --devices 8 --lower tpu --config.mesh.fsdp=8
"""

from __future__ import annotations

import math
import os
import sys

from absl import flags
from ml_collections import config_flags

from sft_jax.cli import absl_args


def _define(values: flags.FlagValues, argv: list[str]) -> None:
    config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                    flag_values=values, sys_argv=argv)  # fmt: skip
    flags.DEFINE_integer("devices", 0, "Device count to plan for (default: this host's).",
                         flag_values=values)  # fmt: skip
    flags.DEFINE_bool("compile", False, "Also compile the train step on faked CPU devices.",
                      flag_values=values)  # fmt: skip
    flags.DEFINE_enum("lower", "", ["", "tpu", "cuda"],
                      "Also lower the train step for this platform on --devices faked CPU "
                      "devices; exit 1 if it cannot be lowered or partitioned.",
                      flag_values=values)  # fmt: skip
    flags.mark_flags_as_required(["config"], flag_values=values)


def activation_bytes(cfg, local_rows: int, seq: int, tensor: int) -> int:
    """What the backward pass keeps, per device. Per layer and token: the block input and
    both norm outputs, q/k/v, the attention output, the MLP's pre-activations (dtype
    bytes; the activation's output is recomputed, sft_jax.model.with_recomputed_activation), and two
    float32 softmax statistics per head (sft_jax.attention keeps no [seq, keys]
    probabilities) — split over `tensor` where the model shards them. `remat` keeps only
    the block inputs (+ one layer live)."""
    b = 2 if cfg.dtype == "bfloat16" else 4
    q = cfg.n_heads * cfg.dim_per_head
    kv = cfg.n_kv_heads * cfg.dim_per_head
    mlp = (2 if cfg.mlp == "swiglu" else 1) * cfg.d_ff  # gate and up, or c_fc's output
    per_token_layer = (3 * cfg.d_model + (q + 2 * kv + q + mlp) / tensor) * b
    per_token_layer += 2 * 4 * cfg.n_heads / tensor  # softmax maximum and 1 / Σ exp
    tokens = local_rows * seq
    logits = 3 * 4 * tokens * cfg.vocab_size / tensor  # logits, log-softmax, their gradient
    if cfg.remat == "none":
        kept = cfg.n_layers * per_token_layer
    else:
        kept = cfg.n_layers * cfg.d_model * b + per_token_layer
    return int(tokens * kept + logits)


def plan(c, n_devices: int) -> dict:
    """Per-device bytes of params, optimizer state, gradients and activations for config `c`
    on `n_devices` devices (its mesh.* sizes, -1 filled in). Nothing is allocated."""
    import flax.linen as nn
    import jax
    import numpy as np
    from jax.sharding import AbstractMesh, AxisType

    from sft_jax import config as config_lib
    from sft_jax import optim, sharding, steps
    from sft_jax.model import GPT

    sizes = {"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if free:
        sizes[free[0]] = n_devices // math.prod(v for v in sizes.values() if v != -1)
    if math.prod(sizes.values()) != n_devices:
        raise SystemExit(f"sft-jax-plan: mesh {sizes} does not cover {n_devices} devices")
    try:
        model_cfg = config_lib.model_config(c)
    except ValueError as e:  # init_from on a hub this machine cannot reach: plan the preset
        print(f"note: {e}\nplanning model.preset={c.model.preset!r} instead")
        c.model.init_from = ""
        model_cfg = config_lib.model_config(c)
    config_lib.check(c, model_cfg, sizes)
    mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * 3)
    tx, schedule = optim.make_optimizer(config_lib.optim_config(c), max(c.train.steps, 10**6))
    boxed = jax.eval_shape(lambda r: steps.init_state(r, GPT(model_cfg), tx), jax.random.key(0))
    shardings = sharding.tree_shardings(boxed, mesh)
    abstract = nn.meta.unbox(boxed)

    def per_device(tree, tree_shardings) -> int:
        total = 0
        for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_shardings), strict=True):
            axes = [
                a for part in s.spec if part for a in ((part,) if isinstance(part, str) else part)
            ]
            total += (
                leaf.size * np.dtype(leaf.dtype).itemsize // math.prod(mesh.shape[a] for a in axes)
            )
        return total

    params = per_device(abstract.params, shardings.params)
    local_rows = c.train.batch_size // c.train.micro_steps // (sizes["data"] * sizes["fsdp"])
    return {
        "model": model_cfg,
        "mesh": sizes,
        "local_rows": local_rows,
        "params": params,
        "optimizer": per_device(abstract.opt_state, shardings.opt_state),
        "gradients": params * 4 // np.dtype(model_cfg.param_dtype).itemsize,  # float32 sums
        "activations": activation_bytes(model_cfg, local_rows, c.data.max_seq_len, sizes["tensor"]),
        "tx": tx,
        "schedule": schedule,
    }


def _abstract_step(c, p):
    """(step functions on the faked devices' mesh, abstract state, abstract batch)."""
    import jax
    import numpy as np

    from sft_jax import sharding, train
    from sft_jax.model import GPT

    mesh = sharding.make_mesh(**p["mesh"])
    fns = train.build_steps(GPT(p["model"]), p["tx"], p["schedule"], mesh, c.train.micro_steps)
    shape = (c.train.batch_size, c.data.max_seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, dt, sharding=fns.batch_sharding)
        for k, dt in (("tokens", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                      ("segment_ids", np.int32), ("positions", np.int32))
    }  # fmt: skip
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        fns.abstract_state, fns.state_shardings,
    )  # fmt: skip
    return fns, state, batch


def _compiled_memory(c, p) -> None:
    """Compile the real train step on the (faked) devices and print XLA's figures."""
    import jax

    fns, state, batch = _abstract_step(c, p)
    with fns.context():
        mem = fns.train_step.lower(state, batch).compile().memory_analysis()
    gib = 1024**3
    print(f"XLA, compiled for {jax.device_count()} CPU devices: temp "
          f"{mem.temp_size_in_bytes / gib:.3f} GiB, arguments "
          f"{mem.argument_size_in_bytes / gib:.3f} GiB per device")  # fmt: skip


def lower_train_step(c, p, target: str):
    """The real train step lowered for `target` ("tpu" or "cuda") over the plan's mesh of
    faked devices, with the kernels that platform runs. Raises what lowering raises."""
    from sft_jax import kernels

    with kernels.target_platform(target):
        fns, state, batch = _abstract_step(c, p)
        with fns.context():
            return fns.train_step.trace(state, batch).lower(lowering_platforms=(target,))


def _lower(c, p, target: str) -> int:
    from sft_jax import kernels

    model_cfg = p["model"]
    with kernels.target_platform(target):
        kernel = kernels.resolve(model_cfg.attention, dtype=model_cfg.dtype)
    try:
        lowered = lower_train_step(c, p, target)
    except Exception as e:  # any lowering or partitioning failure is the answer here
        print(f"sft-jax-plan: the train step does not lower for {target} on mesh {p['mesh']} "
              f"(attention={kernel}): {type(e).__name__}: {e}", file=sys.stderr)  # fmt: skip
        if kernel == "cudnn" and "cuDNN is not detected" in str(e):
            # JAX asks the installed cuDNN for its version while tracing the fused kernel.
            print("  cuDNN's fused attention can only be lowered where a CUDA jaxlib and cuDNN "
                  "are installed; add --config.model.attention=xla to check the rest of the "
                  "step's partitioning here", file=sys.stderr)  # fmt: skip
        return 1
    print(f"lowered for {target} on mesh {p['mesh']} (attention={kernel}): "
          f"{len(lowered.as_text())} characters of StableHLO")  # fmt: skip
    return 0


def main(argv=None) -> int:
    args, _ = absl_args.parse("sft-jax-plan", __doc__, _define, argv)
    if (args.compile or args.lower) and args.devices:
        # Before jax is imported: fake the planned number of CPU devices.
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    c = args.config
    p = plan(c, args.devices or jax.device_count())
    model_cfg, sizes = p["model"], p["mesh"]
    gib = 1024**3
    total = sum(p[k] for k in ("params", "optimizer", "gradients", "activations"))
    print(f"{model_cfg.num_params() / 1e6:.1f} M params, mesh {sizes}; per device:")
    print(f"  params           {p['params'] / gib:9.3f} GiB")
    print(f"  optimizer state  {p['optimizer'] / gib:9.3f} GiB")
    print(f"  gradients        {p['gradients'] / gib:9.3f} GiB")
    print(f"  activations     ~{p['activations'] / gib:9.3f} GiB (estimate; {p['local_rows']} rows"
          f" × {c.data.max_seq_len} tokens, remat={model_cfg.remat})")  # fmt: skip
    print(f"  total           ~{total / gib:9.3f} GiB")
    if args.compile:
        _compiled_memory(c, p)
    if args.lower:
        return _lower(c, p, args.lower)
    return 0


if __name__ == "__main__":
    sys.exit(main())
