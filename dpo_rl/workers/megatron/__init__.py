"""The Megatron-core layer: parallel state, CPU shim, model factory, HF interop, log-probs, generation.

Importing it silences megatron-core's import-time notices that optional CUDA extensions
(TransformerEngine, Apex) are absent: on CPU that is expected, and the fallbacks are the
ones this project uses. Other warnings are untouched.
"""

import warnings

for _message in (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
