"""Every config in configs/ loads, converts and evaluates its shapes without allocating;
every pod and cluster recipe fits its stated devices by the memory plan."""

import glob
import importlib.util
import os
import pathlib
import re

import jax
import pytest

from sft_jax import config as config_lib
from sft_jax import memory_plan, steps
from sft_jax.model import GPT
from sft_jax.optim import make_optimizer
from tests.run_config import model_config, parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# recipes.py is the 8B–72B recipes' shared builder, not a config of its own.
CONFIGS = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not p.endswith(("__init__.py", "recipes.py"))
)


def _module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(path):
    return _module(path).get_config()


def test_there_are_configs():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"default.py", "tiny.py", "gpt2_alpaca.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_its_state_shapes_evaluate(path):
    c = _load(path)
    if c.model.init_from.startswith("hf:") and not os.path.exists(c.model.init_from[3:]):
        # A hub source (no hub here): its preset must name the same architecture.
        assert c.model.preset
        c.model.init_from = ""
    model_cfg = model_config(c)
    optim_cfg = config_lib.optim_config(c)
    config_lib.data_spec(c)
    config_lib.check(parse(c), model_cfg, {"data": 1, "fsdp": 1, "tensor": 1})
    tx, _ = make_optimizer(optim_cfg, max(c.train.steps, optim_cfg.warmup_steps, 1))
    abstract = jax.eval_shape(lambda r: steps.init_state(r, GPT(model_cfg), tx), jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    assert n_params == model_cfg.num_params()


# Recipes for real machines (a TARGETS table: target → devices, device, batch, micro-steps),
# and their models' parameter counts as their model cards give them.
RECIPES = {
    "llama3_8b.py": 8_030_261_248,  # meta-llama/Llama-3.1-8B-Instruct
    "llama3_70b.py": 70_553_706_496,  # meta-llama/Llama-3.1-70B-Instruct
    "qwen25_72b.py": 72_706_203_648,  # Qwen/Qwen2.5-72B-Instruct
    "qwen3_30b_a3b.py": 30_532_122_624,  # Qwen/Qwen3-30B-A3B-Instruct-2507 ("30.5B")
}
HEADROOM = 0.15  # of each device's memory, left free by every recipe's plan


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_fits_its_devices_with_headroom(name):
    module = _module(os.path.join(ROOT, "configs", name))
    assert set(module.TARGETS) == {"v5p", "h100"}
    for target, (devices, device, batch_size, micro_steps, *_) in module.TARGETS.items():
        c = module.get_config(target)
        assert c.model.init_from.startswith("hf:")  # real users start from the hub weights
        assert (c.train.batch_size, c.train.micro_steps) == (batch_size, micro_steps)
        assert (c.model.dtype, c.model.param_dtype) == ("bfloat16", "float32")
        assert c.model.remat != "none" and 3072 <= c.data.max_seq_len <= 8192
        platform = "tpu" if device.startswith("v") else "gpu"
        p = memory_plan.plan(parse(c), devices, platform)  # the model.architecture: no hub
        assert p["model"].num_params() == RECIPES[name]
        memory = memory_plan.device_bytes(device)
        assert p["total"] <= (1 - HEADROOM) * memory, memory_plan.report(
            p, c.data.max_seq_len, memory
        )


def test_gpt_oss_lora_recipes_fit_their_gpus_with_headroom():
    """gpt-oss-20b LoRA on one H100 and gpt-oss-120b on 8 (their experts split 8 ways): the
    bfloat16 base as published in size (20.91B, 116.83B), adapters on attention, planned
    from the written-down architecture (no hub)."""
    module = _module(os.path.join(ROOT, "configs", "gpt_oss_lora.py"))
    counts = {"gpt-oss-20b": 20_914_757_184, "gpt-oss-120b": 116_829_156_672}
    for target, (
        devices,
        device,
        batch_size,
        micro_steps,
        preset,
        expert,
    ) in module.TARGETS.items():
        c = module.get_config(target)
        assert (c.train.batch_size, c.train.micro_steps, c.mesh.expert) == (
            batch_size,
            micro_steps,
            expert,
        )
        assert c.lora.rank > 0 and c.lora.base_dtype == "bfloat16"
        p = memory_plan.plan(parse(c), devices, "gpu")
        assert p["model"].num_params() == counts[preset] and p["model"].attention_sinks
        memory = memory_plan.device_bytes(device)
        assert p["total"] <= (1 - HEADROOM) * memory, memory_plan.report(
            p, c.data.max_seq_len, memory
        )


def test_model_architecture_replaces_preset_fields_and_must_match_init_from(tmp_path):
    import json

    from configs import tiny
    from sft_jax import hf

    c = tiny.get_config()
    c.model.preset = "tiny-llama"
    c.model.architecture.update(d_model=96, n_layers=3)
    cfg = model_config(c)
    assert (cfg.d_model, cfg.n_layers, cfg.family) == (96, 3, "llama")
    c.model.architecture.dtype = "bfloat16"  # numerics are model.* keys
    with pytest.raises(ValueError, match=r"unknown model.architecture keys \['dtype'\]"):
        model_config(c)
    # With init_from, the written-down shapes must be the checkpoint's.
    del c.model.architecture["dtype"]
    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(cfg)))
    c.model.init_from = f"hf:{tmp_path}"
    assert model_config(c).d_model == 96
    c.model.architecture.d_model = 128
    with pytest.raises(ValueError, match="d_model=128 .its config: 96."):
        model_config(c)


@pytest.mark.parametrize("name", ["llama3_70b.py", "qwen25_72b.py"])
def test_pod_recipe_plans_and_lowers_for_tpu_on_its_mesh(name, console_script, one_device_env):
    # What a user runs before paying for the pod: the plan on the slice's 64 chips, and the
    # real train step (splash attention in shard_map, 8192-token rows) lowered for TPU on
    # 64 faked CPU devices. The recipe's full depth: the layers are one scanned block.
    import subprocess

    devices, device, *_ = _module(os.path.join(ROOT, "configs", name)).TARGETS["v5p"]
    done = subprocess.run(
        [
            console_script("sft-jax-plan"),
            "--config",
            os.path.join(ROOT, "configs", name) + ":v5p",
            "--devices",
            str(devices),
            "--device",
            device,
            "--lower",
            "tpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=one_device_env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fits in 95.0 GiB per device" in done.stdout
    assert (
        "lowered for tpu on mesh {'data': 1, 'fsdp': 64, "
        "'expert': 1, 'tensor': 1} (attention=splash)" in (done.stdout)
    )


def test_every_preset_is_listed_where_users_look():
    """README's useful keys and configs/default.py's comment name every preset (they once
    showed 7 of 15)."""
    from sft_jax.model import PRESETS

    root = pathlib.Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    default = (root / "configs" / "default.py").read_text(encoding="utf-8")
    for name in PRESETS:
        assert f"`{name}`" in readme, name
        assert re.search(rf"[ ,]{re.escape(name)}[,.]", default), name
