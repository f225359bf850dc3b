"""Makes the test-only packages unimportable in a process whose PYTHONPATH starts with this
folder, as in the README's runtime-only install (`pip install -e .`, no extras): `import
torch` raises ImportError and `importlib.util.find_spec("torch")` is None, which is how
transformers decides that torch is absent. Used by tests that run the product's commands
(`tests/conftest.runtime_env`). Both times the runtime needed a test-only package, every
test passed and only a fresh machine failed: transformers 5.25's GGUF reader needed torch,
and a top-level import of sft_jax.harness needed lm-eval."""

import sys

# The test extra's packages (setup.py) that the runtime install does not bring.
TEST_ONLY = ("torch", "accelerate", "peft", "lm_eval", "wandb", "mlflow", "hypothesis", "moto")

for name in TEST_ONLY:
    sys.modules[name] = None
