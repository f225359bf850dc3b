"""Per-device memory of a training config on a mesh, from shapes alone (`sft-jax-plan`).

Parameters and optimizer state are exact: `jax.eval_shape` of the real init, each leaf
divided by the mesh axes its sharding rule splits it over (the same rules and divisibility
fallback as training). Everything else is a formula over the model's shapes, one named term
per buffer family of the compiled train step (`activation_terms`), derived from the code it
counts (sft_jax.model, sft_jax.attention, sft_jax.losses, sft_jax.steps) and checked
against XLA's own figure for the real compiled step (tests/test_memory_plan.py).

Measured on 8 faked CPU devices in float32: 0.84-1.14 of XLA's peak over 18 small shapes;
1.20-1.22 on a 2-layer Llama-70B-shaped step (2048 tokens per device, remat none and
full). The loss's and one layer's backward working sets are added, though XLA overlaps
them in part: the plan errs high, the safe side for "does it fit". bfloat16 activations
count 2 bytes, as accelerators keep them (XLA on CPU widens them to float32).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

# Memory of one device, by the names `sft-jax-plan --device` takes (data sheets: TPU v5p
# has 95 GiB of HBM per chip, v5e 16 GiB, v4 32 GiB; NVIDIA's 80 GB cards 80·10⁹ bytes).
DEVICES = {
    "v4": 32 * 2**30,
    "v5e": 16 * 2**30,
    "v5p": 95 * 2**30,
    "v6e": 32 * 2**30,
    "a100-40gb": 40 * 10**9,
    "a100-80gb": 80 * 10**9,
    "h100-80gb": 80 * 10**9,
}

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def device_bytes(text: str) -> int:
    """Bytes of one device: a name of `DEVICES` ("v5p") or a size ("95GiB", "80GB")."""
    if text.lower() in DEVICES:
        return DEVICES[text.lower()]
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(
            f"device memory {text!r}: give a size such as 95GiB or 80GB, or one of "
            f"{', '.join(DEVICES)}"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What one device computes per micro-step: `rows` of `seq` tokens, with heads, MLP
    width and vocabulary split over `tensor`; `xla_attention` when attention runs as
    sft_jax.attention's XLA ops (not a fused TPU/GPU kernel), `cudnn_mask` when it runs as
    cuDNN's, which takes the packed rows' mask as a dense bias; with LoRA, the frozen
    base's storage and the adapters' width."""

    rows: int
    seq: int
    tensor: int = 1
    xla_attention: bool = True
    # LoRA (0 and 0 for full fine-tuning): bytes per weight of the frozen base as stored
    # (`lora.base_dtype`, or NF4/int8's bits / 8), and the adapters' ranks summed over one
    # block's adapted layers (how wide the x·A activations each adapter keeps are).
    base_bytes: float = 0.0
    adapter_width: int = 0
    cudnn_mask: bool = False
    expert: int = 1  # the mesh's expert axis (a mixture of experts' experts split over it)


WEIGHTS_TERM = "one layer's gathered weights and gradients"
CUDNN_MASK_TERM = "cuDNN attention's dense mask (bias) and its gradient"


def activation_terms(cfg, step: StepShape) -> dict[str, int]:
    """Bytes per device of the train step's buffers beyond params, optimizer state and
    gradients, by name. `cfg` is a sft_jax.model.GPTConfig.

    The counts of each term (how many buffers of that shape are live at the peak) were
    read off XLA's buffer assignment of the compiled step on CPU and are checked against
    its peak over several shapes and remat policies in tests/test_memory_plan.py."""
    b = 2 if cfg.dtype in ("bfloat16", "float16") else 4  # activation bytes
    t = step.tensor
    tokens = step.rows * step.seq
    d, heads = cfg.d_model, cfg.n_heads
    q = heads * cfg.dim_per_head
    kv = cfg.n_kv_heads * cfg.dim_per_head
    mlp_in = (1 if cfg.mlp == "gelu" else 2) * cfg.d_ff  # c_fc's output, or gate and up
    # What the backward pass keeps of one layer, per token (the scan stacks it over
    # layers): eight d_model-wide tensors (the block input, both norms' inputs and outputs,
    # both branches' outputs, the MLP's output), q twice (as projected, and heads first
    # as sft_jax.attention.attend takes it) and attention's output, k and v, the MLP's
    # pre-activations (its activation is recomputed: model.with_recomputed_activation),
    # and two float32 softmax statistics per head: no [queries, keys] scores are kept.
    layer = b * (8 * d + (3 * q + 2 * kv + mlp_in) / t) + 2 * 4 * heads / t
    # LoRA: each adapter's x·A [tokens, r] too (B's gradient needs it; x is kept already).
    layer += b * step.adapter_width
    # Gemma's sandwich norms (inputs and outputs of two more norms) and q/k norms (q and k
    # before them): counted like the others, not yet read off a compiled step.
    layer += b * ((4 * d if cfg.sandwich_norms else 0) + ((q + kv) / t if cfg.qk_norm else 0))
    if cfg.remat == "full":
        # Only each block's input; the block being differentiated is recomputed into the
        # buffers its backward pass uses anyway (the working set below).
        kept = cfg.n_layers * b * d
    else:  # "dots" keeps every matmul output: here that is nearly all of `layer`
        kept = cfg.n_layers * layer
    # The layer being differentiated: its weights gathered over fsdp, and their full-size
    # float32 gradient before it is reduce-scattered. A LoRA base takes no gradient: its
    # weights gathered as stored, and a copy in the compute dtype (cast or dequantized).
    layer_params = d * (q + 2 * kv) + q * d + (mlp_in + cfg.d_ff) * d
    weights = (b + (step.base_bytes or 4)) * layer_params / t
    # Its MLP's backward: float32 [tokens, d_ff] gradients of the pre-activations and the
    # recomputed activation (three for SwiGLU's gate and up, two for GELU).
    mlp = 4 * tokens * (mlp_in + cfg.d_ff) / t
    dispatch = 0
    if cfg.n_experts:
        weights, mlp, dispatch = _expert_terms(cfg, step, b)
    # The XLA attention's backward (sft_jax.attention._attend_bwd): float32 scores,
    # probabilities and score gradients of every causal query block, the unrolled blocks
    # live side by side: 3 × [rows, heads, ~seq²/2]. A fused kernel (splash, cuDNN) keeps
    # its blocks on chip instead.
    attention = 3 * 4 * step.rows * heads / t * step.seq**2 / 2 if step.xla_attention else 0
    # cuDNN (sft_jax.kernels.cudnn_attention) takes the segment mask as a dense additive
    # bias [rows, 1, seq, seq] in the compute dtype (JAX's combine_bias_and_mask), and JAX
    # always asks cuDNN for the bias's gradient, of the same shape and dtype: the mask of a
    # micro-step's rows is the same in every layer, one of each is live at a time. Heads
    # are its broadcast axis of 1, so tensor does not split it.
    cudnn_mask = 2 * b * step.rows * step.seq**2 if step.cudnn_mask else 0
    # The chunked loss (sft_jax.losses.chunked_cross_entropy, per device in shard_map):
    # float32 logits, exp and their gradient for one chunk of 128 of this device's
    # positions (tensor splits the positions, not the vocabulary), the head gathered whole
    # in the compute dtype and its float32 gradient accumulated across chunks; a LoRA
    # run's head is frozen: autodiff drops that gradient, and XLA the loop that sums it.
    chunk = min(128, -(-step.seq // t))
    head_bytes = b + (0 if step.base_bytes else 4)
    loss = 3 * 4 * step.rows * chunk * cfg.vocab_size + head_bytes * cfg.vocab_size * d
    return {
        "activations kept for the backward pass": int(tokens * kept),
        "one layer's MLP backward": int(mlp),
        WEIGHTS_TERM: int(weights),
        "attention's query blocks (XLA attention)": int(attention),
        CUDNN_MASK_TERM: int(cudnn_mask),
        "chunked loss: logits of a chunk, head gradient": int(loss),
        DISPATCH_TERM: int(dispatch),
    }


DISPATCH_TERM = "experts' dispatch: gathered tokens, sorted slots, outputs"


def _expert_terms(cfg, step: StepShape, b: int) -> tuple[float, float, float]:
    """A mixture of experts' (weights, MLP backward, dispatch) terms for the layer being
    differentiated (sft_jax.model.moe). The expert group's tokens are gathered onto each
    device (ep × its tokens) and sorted into k slots each; the experts it holds enter whole
    (gathered over fsdp and tensor at the shard_map's edge, E / ep of them), with their
    float32 gradients. Not read off a compiled CPU step as the dense terms are (XLA:CPU
    runs another grouped matmul): `sft-jax-plan --topology` compiles the TPU one."""
    d, f, k, ep = cfg.d_model, cfg.d_expert, cfg.experts_per_token, step.expert
    hd = cfg.dim_per_head
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    held = cfg.n_experts // ep * 3 * d * f  # each expert's gate, up (or gate_up) and down
    attention = (d * (q + 2 * kv) + q * d) / step.tensor
    router = d * cfg.n_experts
    weights = (b + (step.base_bytes or 4)) * (attention + router + held)
    gathered = ep * step.rows * step.seq  # tokens this device runs through its experts
    slots = gathered * k
    # The backward of the experts: float32 gradients of the gate and up pre-activations
    # and of the activation, [slots, d_expert] each, as the dense MLP's are.
    mlp = 4 * slots * 3 * f
    # The gathered tokens, the sorted slot rows and the slot outputs (compute dtype), and
    # float32 gradients of each; the router's float32 logits and probabilities.
    dispatch = (b + 4) * (
        gathered * d + 2 * slots * d
    ) + 2 * 4 * step.rows * step.seq * cfg.n_experts
    return weights, mlp, dispatch


def mesh_sizes(mesh, n_devices: int) -> dict[str, int]:
    """The mesh.* sizes (`config.MeshSection`) on `n_devices`, -1 filled in."""
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "expert": mesh.expert, "tensor": mesh.tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if free:
        sizes[free[0]] = n_devices // math.prod(v for v in sizes.values() if v != -1)
    if math.prod(sizes.values()) != n_devices:
        raise SystemExit(f"sft-jax-plan: mesh {sizes} does not cover {n_devices} devices")
    return sizes


def plan(run, n_devices: int, platform: str = "") -> dict:
    """Per-device bytes of the run (`config.RunConfig`) on `n_devices` devices: "terms" (name
    → bytes, params, optimizer state and gradients exact, the rest `activation_terms`), their
    "total", and what planning built ("model", "mesh", "local_rows", "tx", "schedule").
    `platform` ("tpu", "gpu", "cpu"; default JAX's) decides which attention kernel runs.
    Nothing is allocated: shapes come from `jax.eval_shape`."""
    import flax.linen as nn
    import jax
    from jax.sharding import AbstractMesh, AxisType

    from sft_jax import config as config_lib
    from sft_jax import hf, kernels, optim, sharding, steps
    from sft_jax.model import GPT

    sizes = mesh_sizes(run.mesh, n_devices)
    model_section = run.model
    if model_section.init_from and model_section.architecture:
        # The recipe states its shapes: no hub needed to plan them.
        model_section = dataclasses.replace(model_section, init_from="")
    try:
        model_cfg = config_lib.model_config(
            dataclasses.replace(run, model=model_section), hf.load_config
        )
    except ValueError as e:  # init_from on a hub this machine cannot reach
        print(f"note: {e}\nplanning model.preset={run.model.preset!r} instead")
        model_section = dataclasses.replace(model_section, init_from="")
        model_cfg = config_lib.model_config(dataclasses.replace(run, model=model_section))
    config_lib.check(run, model_cfg, sizes)
    mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * 4)
    tx, schedule = optim.make_optimizer(run.optim, max(run.train.steps, 10**6))
    spec = run.lora
    model = GPT(model_cfg, spec.layers(model_cfg))
    boxed = jax.eval_shape(lambda r: steps.init_state(r, model, tx), jax.random.key(0))
    shardings = sharding.tree_shardings(boxed, mesh)
    abstract = nn.meta.unbox(boxed)
    per_device = functools.partial(_per_device, mesh=mesh)

    params = per_device(abstract.params, shardings.params)
    # Gradients are float32 sums of what is trained (LoRA: the adapters alone, the base
    # takes none); with micro_steps > 1 the accumulator is a second copy.
    trained, frozen = steps.partition(model, abstract.params)
    trained_shardings, frozen_shardings = steps.partition(model, shardings.params)
    grads = per_device(trained, trained_shardings, itemsize=4)
    grads *= 2 if run.train.micro_steps > 1 else 1
    batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    local_rows = run.train.batch_size // run.train.micro_steps // batch_shards
    kernel = kernels.resolve(
        model_cfg.attention, platform or None, model_cfg.dtype, sinks=model_cfg.attention_sinks
    )
    step = StepShape(
        local_rows,
        run.data.max_seq_len,
        sizes["tensor"],
        kernel == "xla",
        *_lora_step(model_cfg, spec, frozen),
        cudnn_mask=kernel == "cudnn",
        expert=sizes["expert"],
    )
    terms = {
        "parameters": params,
        "optimizer state": per_device(abstract.opt_state, shardings.opt_state),
        "gradients (float32)": grads,
        **activation_terms(model_cfg, step),
    }
    lora_parts = None
    if spec.enabled:
        lora_parts = {
            "spec": spec,
            "frozen base": per_device(frozen, frozen_shardings),
            "adapters": per_device(trained, trained_shardings),
            "base bits per weight": 8 * step.base_bytes,
        }
    return {
        "model": model_cfg,
        "mesh": sizes,
        "local_rows": local_rows,
        "attention": kernel,
        "terms": terms,
        "total": sum(terms.values()),
        "lora": lora_parts,
        "tx": tx,
        "schedule": schedule,
    }


def _per_device(tree, tree_shardings, mesh, itemsize: int = 0) -> int:
    """Bytes one device holds of `tree` (shapes) laid out by `tree_shardings`: each leaf
    over the mesh axes its sharding splits it by; `itemsize` (bytes) in place of each
    leaf's own (gradients: float32)."""
    import jax
    import numpy as np

    total = 0
    for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_shardings), strict=True):
        axes = [a for part in s.spec if part for a in ((part,) if isinstance(part, str) else part)]
        size = itemsize or np.dtype(leaf.dtype).itemsize
        total += leaf.size * size // math.prod(mesh.shape[a] for a in axes)
    return total


def _lora_step(cfg, spec, frozen) -> tuple[float, int]:
    """(StepShape.base_bytes, StepShape.adapter_width) of LoRA `spec` on the model `cfg`
    whose frozen base (shapes) is `frozen`; (0, 0) without LoRA."""
    import numpy as np

    from sft_jax import lora, quant

    if not spec.enabled:
        return 0.0, 0
    if spec.quantize:
        base_bytes = quant.bits_per_param(frozen) / 8  # the block kernels, scales included
    else:
        base_bytes = np.dtype(spec.base_dtype or cfg.param_dtype).itemsize
    return base_bytes, spec.rank * len(lora.resolve_targets(cfg, spec))


def report(p: dict, seq: int, device_memory: int = 0) -> str:
    """The plan as the lines `sft-jax-plan` prints: every term, biggest first, the total
    and, given a device's memory, whether it fits and with what headroom."""
    gib = 2**30
    cfg = p["model"]
    lines = [
        f"{cfg.num_params() / 1e6:.1f} M params, mesh {p['mesh']}, {p['local_rows']} rows × "
        f"{seq} tokens per device and micro-step, remat={cfg.remat}, dtype={cfg.dtype}, "
        f"attention={p['attention']}; per device, biggest first:"
    ]
    for name, n in sorted(p["terms"].items(), key=lambda kv: -kv[1]):
        if not n:  # e.g. attention's query blocks under a fused kernel
            continue
        lines.append(f"  {n / gib:9.3f} GiB  {100 * n / p['total']:4.1f} %  {name}")
        if name == "parameters" and p.get("lora"):
            lines.append(_lora_line(p["lora"], cfg))
    lines.append(f"  {p['total'] / gib:9.3f} GiB  total")
    if device_memory:
        headroom = 1 - p["total"] / device_memory
        verdict = "fits" if headroom >= 0 else "does NOT fit"
        lines.append(
            f"{verdict} in {device_memory / gib:.1f} GiB per device "
            f"(headroom {100 * headroom:.0f} %)"
        )
    return "\n".join(lines)


def _lora_line(parts: dict, cfg) -> str:
    """What a LoRA plan's parameters are: the frozen base as stored, and the adapters."""
    spec = parts["spec"]
    stored = spec.quantize or spec.base_dtype or cfg.param_dtype
    return (
        f"             of which: frozen base {parts['frozen base'] / 2**30:.3f} GiB "
        f"(block kernels {stored}, {parts['base bits per weight']:.2f} bits per weight), "
        f"LoRA adapters {parts['adapters'] / 2**30:.3f} GiB (float32, rank {spec.rank}; "
        "gradients and optimizer state for these alone)"
    )


def comparison(lora_plan: dict, full_plan: dict) -> str:
    """A LoRA plan beside full fine-tuning's of the same model on the same mesh: each term
    per device, the totals, and LoRA's share of full fine-tuning's total."""
    gib = 2**30
    spec = lora_plan["lora"]["spec"]
    label = f"LoRA r={spec.rank}" + (f" {spec.quantize}" if spec.quantize else "")
    lines = [f"against full fine-tuning, per device (GiB):\n  {label:>14} {'full FT':>10}"]
    for name, full_bytes in full_plan["terms"].items():
        lora_bytes = lora_plan["terms"][name]
        if lora_bytes or full_bytes:
            lines.append(f"  {lora_bytes / gib:14.3f} {full_bytes / gib:10.3f}  {name}")
    lines.append(f"  {lora_plan['total'] / gib:14.3f} {full_plan['total'] / gib:10.3f}  total")
    share = lora_plan["total"] / full_plan["total"]
    lines.append(f"LoRA needs {100 * share:.1f} % of full fine-tuning's memory per device")
    return "\n".join(lines)
