"""The user commands, installed as console scripts by setup.py:

    sft-jax-export     a training checkpoint → a Hugging Face folder         export.py
    sft-jax-generate   responses from a run or an exported folder            generate.py
    sft-jax-inspect    what a config's data turns into, and what is trained  inspect.py
    sft-jax-plan       memory per device of a config on a mesh               plan.py

Each module has `main(argv=None) -> int`; `python -m sft_jax.cli.<module>` runs it too.
"""
