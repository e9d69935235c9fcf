"""dpo_rl: preference optimisation of LLMs on Megatron-core and Ray.

The top-level package is importable without Ray workers or a GPU; what runs inside
workers (the Megatron-core layer) lives in :mod:`dpo_rl.workers`.
"""

__version__ = "0.1.0"
