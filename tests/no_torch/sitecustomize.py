"""Makes torch unimportable in a process whose PYTHONPATH starts with this folder, as in a
runtime-only install (`pip install -e .`, no test extras): `import torch` raises ImportError
and `importlib.util.find_spec("torch")` is None, which is how transformers decides that torch
is absent. Used by tests that run the product's commands (`tests/conftest.no_torch_env`)."""

import sys

sys.modules["torch"] = None
