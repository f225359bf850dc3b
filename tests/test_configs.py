"""Every config in configs/ loads, converts and evaluates its shapes without allocating."""

import glob
import importlib.util
import os

import jax
import pytest

from sft_jax import config as config_lib
from sft_jax import steps
from sft_jax.model import GPT
from sft_jax.optim import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    p for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not p.endswith("__init__.py")
)


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


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
    model_cfg = config_lib.model_config(c)
    optim_cfg = config_lib.optim_config(c)
    config_lib.data_spec(c)
    config_lib.check(c, model_cfg, {"data": 1, "fsdp": 1, "tensor": 1})
    tx, _ = make_optimizer(optim_cfg, max(c.train.steps, optim_cfg.warmup_steps, 1))
    abstract = jax.eval_shape(lambda r: steps.init_state(r, GPT(model_cfg), tx), jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    assert n_params == model_cfg.num_params()
