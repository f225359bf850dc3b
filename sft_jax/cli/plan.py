r"""Per-device memory of a training config on a mesh, before paying for the machines.

    sft-jax-plan --config configs/llama3_70b.py:v5p --devices 64 --device v5p

Prints each term (parameters, optimizer state, gradients, kept activations, the loss's and
attention's working sets …) biggest first, so a config that does not fit says why, and with
`--device` (a name: v5p, h100-80gb, …; or a size: 95GiB, 80GB) whether it fits and the
headroom left; exit 2 if it does not. Parameters and optimizer state are exact; the rest
is sft_jax.memory_plan's formula, checked against XLA's compiled figure in the tests.
`--compile` also compiles the real train step on faked CPU devices and prints XLA's own
figure (on CPU, XLA keeps bfloat16 intermediates in float32, so it reads higher than an
accelerator for bfloat16 configs).

`--lower tpu` (or `cuda`) lowers the real train step for that platform on `--devices`
faked CPU devices with the config's mesh and the kernels that platform would run (TPU:
splash attention inside shard_map): a config that will not partition fails here, on a
laptop, with the lowering error and a non-zero exit, before the pod is paid for.

    sft-jax-plan --config configs/X.py --devices 8 --lower tpu --config.mesh.fsdp=8
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from sft_jax import memory_plan
from sft_jax.cli import absl_args


def _define(values: flags.FlagValues, argv: list[str]) -> None:
    config_flags.DEFINE_config_file(
        "config", None, "Training config file (configs/*.py).", flag_values=values, sys_argv=argv
    )
    flags.DEFINE_integer(
        "devices", 0, "Device count to plan for (default: this host's).", flag_values=values
    )
    names = ", ".join(memory_plan.DEVICES)
    flags.DEFINE_string(
        "device",
        "",
        f"Memory of one device: a name ({names}) or a size "
        "(95GiB, 80GB); exit 2 if the plan does not fit.",
        flag_values=values,
    )
    flags.DEFINE_bool(
        "compile", False, "Also compile the train step on faked CPU devices.", flag_values=values
    )
    flags.DEFINE_enum(
        "lower",
        "",
        ["", "tpu", "cuda"],
        "Also lower the train step for this platform on --devices faked CPU "
        "devices; exit 1 if it cannot be lowered or partitioned.",
        flag_values=values,
    )
    flags.DEFINE_string(
        "topology",
        "",
        "A Cloud TPU slice (v5p-128, v4-32, v5e-16, v6e-64): compile the real train step for "
        "it with the TPU compiler (libtpu; no TPU needed), print the compiled per-chip HBM "
        "beside the plan and the chip's HBM, and exit 2 if it does not fit.",
        flag_values=values,
    )
    flags.DEFINE_bool(
        "compare_full",
        True,
        "With lora.rank > 0: also plan full fine-tuning of the same model and mesh, side by side.",
        flag_values=values,
    )
    flags.mark_flags_as_required(["config"], flag_values=values)


def _abstract_step(run, p, devices=None):
    """(step functions on a mesh of `devices` (default: JAX's, e.g. faked CPU devices),
    abstract state, abstract batch)."""
    import jax
    import numpy as np

    from sft_jax import sharding, train
    from sft_jax.model import GPT

    mesh = sharding.make_mesh(**p["mesh"], devices=devices)
    model = GPT(p["model"], run.lora.layers(p["model"]))
    fns = train.build_steps(model, p["tx"], p["schedule"], mesh, run.train.micro_steps)
    shape = (run.train.batch_size, run.data.max_seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, dt, sharding=fns.batch_sharding)
        for k, dt in (
            ("tokens", np.int32),
            ("targets", np.int32),
            ("loss_mask", np.float32),
            ("segment_ids", np.int32),
            ("positions", np.int32),
        )
    }
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        fns.abstract_state,
        fns.state_shardings,
    )
    return fns, state, batch


def _peak_bytes(compiled) -> int:
    """XLA's peak per device of a compiled step: temp + arguments + outputs − what the
    donated state aliases."""
    m = compiled.memory_analysis()
    return (
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )


def compiled_bytes(run, p) -> int:
    """XLA's peak per device for the real train step compiled on the (faked) CPU devices."""
    fns, state, batch = _abstract_step(run, p)
    with fns.context():
        return _peak_bytes(fns.train_step.lower(state, batch).compile())


def compile_for_slice(run, p, devices):
    """The real train step compiled by the TPU compiler for `devices` (a slice's, from
    `topology.devices`), with the kernels a TPU runs (splash attention in shard_map)."""
    from sft_jax import kernels

    with kernels.target_platform("tpu"):
        fns, state, batch = _abstract_step(run, p, devices)
        with fns.context():
            return fns.train_step.lower(state, batch).compile()


def _estimated_seconds(compiled) -> float | None:
    """The TPU compiler's own estimate of one step's time (its cost model's
    `optimal_seconds`), or None where the backend gives none."""
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, list) else costs
    seconds = (costs or {}).get("optimal_seconds")
    return float(seconds) if seconds and seconds > 0 else None


def _print_step_time(run, p, devices, seconds: float | None) -> None:
    """The compiler's step-time estimate beside the floor the chip's peak FLOP/s sets."""
    from sft_jax import metrics

    tokens = run.train.batch_size * run.data.max_seq_len
    flops = p["model"].flops_per_token(run.data.max_seq_len, bool(p["lora"])) * tokens
    peak = next(
        (f for kind, f in metrics.PEAK_FLOPS_BF16.items() if kind == devices[0].device_kind), 0.0
    )
    floor = flops / len(devices) / peak if peak else None
    if floor:
        print(
            f"  at the chip's bf16 peak ({peak / 1e12:.0f} TFLOP/s) a step takes at least "
            f"{_seconds(floor)} ({tokens / floor / len(devices):,.0f} tokens/s per chip)"
        )
    if seconds:
        note = "a cost-model estimate, not a measurement"
        if floor and seconds < floor:
            # Seen with scanned layers: XLA's cost analysis counts a while loop's body once.
            note = "below the FLOP floor: the cost model does not count every loop iteration"
        print(f"  the TPU compiler's estimated step time: {_seconds(seconds)} ({note})")


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.2f} ms"


def _compile_topology(run, p, tpu_slice, devices, hbm: int) -> int:
    """Compile for the slice and print its verdict; the exit status (2: does not fit)."""
    kernel = _attention_kernel(p, "tpu")
    try:
        compiled = compile_for_slice(run, p, devices)
    except Exception as e:  # any partitioning or compile failure is the answer here
        print(
            f"sft-jax-plan: the train step does not compile for {tpu_slice.name} "
            f"({tpu_slice.topology_name}, mesh {p['mesh']}, attention={kernel}): "
            f"{type(e).__name__}: {e}",
            file=sys.stderr,
        )
        return 1
    peak = _peak_bytes(compiled)
    fits = peak <= hbm
    print(
        f"TPU compiler, {tpu_slice.name} ({len(devices)} chips, {tpu_slice.topology_name}, "
        f"mesh {p['mesh']}, attention={kernel}): {peak / 2**30:.2f} GiB per chip compiled, "
        f"plan {p['total'] / 2**30:.2f} GiB, HBM {hbm / 2**30:.3g} GiB: "
        + ("fits" if fits else "DOES NOT FIT")
        + f" ({(hbm - peak) / 2**30:+.2f} GiB)"
    )
    _print_step_time(run, p, devices, _estimated_seconds(compiled))
    return 0 if fits else 2


def lower_train_step(run, p, target: str):
    """The real train step lowered for `target` ("tpu" or "cuda") over the plan's mesh of
    faked devices, with the kernels that platform runs. Raises what lowering raises."""
    from sft_jax import kernels

    with kernels.target_platform(target):
        fns, state, batch = _abstract_step(run, p)
        with fns.context():
            return fns.train_step.trace(state, batch).lower(lowering_platforms=(target,))


def _attention_kernel(p, target: str) -> str:
    """The attention implementation the plan's model runs on `target`."""
    from sft_jax import kernels

    model_cfg = p["model"]
    with kernels.target_platform(target):
        return kernels.resolve(
            model_cfg.attention,
            dtype=model_cfg.dtype,
            softcap=model_cfg.attn_softcap,
            sinks=model_cfg.attention_sinks,
        )


def _lower(run, p, target: str) -> int:
    kernel = _attention_kernel(p, target)
    try:
        lowered = lower_train_step(run, p, target)
    except Exception as e:  # any lowering or partitioning failure is the answer here
        print(
            f"sft-jax-plan: the train step does not lower for {target} on mesh {p['mesh']} "
            f"(attention={kernel}): {type(e).__name__}: {e}",
            file=sys.stderr,
        )
        if kernel == "cudnn" and "cuDNN is not detected" in str(e):
            # JAX asks the installed cuDNN for its version while tracing the fused kernel.
            print(
                "  cuDNN's fused attention can only be lowered where a CUDA jaxlib and cuDNN "
                "are installed; add --config.model.attention=xla to check the rest of the "
                "step's partitioning here",
                file=sys.stderr,
            )
        return 1
    print(
        f"lowered for {target} on mesh {p['mesh']} (attention={kernel}): "
        f"{len(lowered.as_text())} characters of StableHLO"
    )
    return 0


def _platform(args) -> str:
    """The platform whose kernels the plan counts: --lower's, else --device's, else JAX's."""
    if args.lower:
        return {"cuda": "gpu"}.get(args.lower, args.lower)
    if args.device.lower() in memory_plan.DEVICES:
        return "tpu" if args.device.lower().startswith("v") else "gpu"
    return ""


def main(argv=None) -> int:
    args, _ = absl_args.parse("sft-jax-plan", __doc__, _define, argv)
    try:
        device_memory = memory_plan.device_bytes(args.device) if args.device else 0
    except ValueError as e:
        print(f"sft-jax-plan: --device: {e}", file=sys.stderr)
        return 1
    if args.topology:
        return _plan_slice(args, device_memory)
    if (args.compile or args.lower) and args.devices:
        # Before jax is imported: fake the planned number of CPU devices.
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from sft_jax import config as config_lib

    run = config_lib.RunConfig.parse(args.config)
    n_devices = args.devices or jax.device_count()
    p = memory_plan.plan(run, n_devices, _platform(args))
    print(memory_plan.report(p, run.data.max_seq_len, device_memory))
    if p["lora"] and args.compare_full:
        full = memory_plan.plan(run.without_lora(), n_devices, _platform(args))
        print(memory_plan.comparison(p, full))
    if args.compile:
        print(
            f"XLA, compiled for {jax.device_count()} CPU devices: "
            f"{compiled_bytes(run, p) / 2**30:.3f} GiB per device"
        )
    if args.lower and _lower(run, p, args.lower):
        return 1
    return 2 if device_memory and p["total"] > device_memory else 0


def _plan_slice(args, device_memory: int) -> int:
    """--topology: the plan for the slice's chips, then the TPU compiler's word on it."""
    from sft_jax import config as config_lib
    from sft_jax import topology

    if args.lower or args.compile:
        print(
            "sft-jax-plan: --topology compiles for the TPU; leave out --lower and --compile",
            file=sys.stderr,
        )
        return 1
    try:
        tpu_slice = topology.parse(args.topology)
        devices = topology.devices(tpu_slice)
    except (ValueError, ImportError) as e:
        print(f"sft-jax-plan: {e}", file=sys.stderr)
        return 1
    if args.devices and args.devices != len(devices):
        print(
            f"sft-jax-plan: --devices={args.devices} but {tpu_slice.name} has {len(devices)} "
            "chips; leave out --devices",
            file=sys.stderr,
        )
        return 1
    hbm = device_memory or tpu_slice.hbm_bytes
    run = config_lib.RunConfig.parse(args.config)
    p = memory_plan.plan(run, len(devices), "tpu")
    print(memory_plan.report(p, run.data.max_seq_len, hbm))
    return _compile_topology(run, p, tpu_slice, devices, hbm)


if __name__ == "__main__":
    sys.exit(main())
