"""The tests' shorthand for what the entry points do at the edge: a ConfigDict parsed once
(`config.RunConfig.parse`), and its model config with model.init_from's config.json read
(`hf.load_config`), as `train.setup` does."""

from sft_jax import config as config_lib
from sft_jax import hf


def parse(c) -> config_lib.RunConfig:
    return config_lib.RunConfig.parse(c)


def model_config(c):
    return config_lib.model_config(parse(c), hf.load_config)
