"""The Megatron-core layer: parallel state, CPU shim, model factory, HF interop, log-probs, generation."""
