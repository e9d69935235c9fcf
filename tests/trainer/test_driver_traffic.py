"""The driver never holds the weights: in a split-actor run, every tensor that passes through it is
sample data, far smaller than one copy of the model (the weight sync streams between the roles)."""

from __future__ import annotations


def test_split_actor_weights_never_pass_through_the_driver(world_dir, split_actor_run):
    """``split_actor_run`` (conftest) counts the tensor bytes of every call's arguments and results."""
    from safetensors.torch import load_file

    _, _, traffic = split_actor_run
    model_bytes = sum(t.numel() * t.element_size() for t in load_file(str(world_dir / "sft" / "model.safetensors")).values())
    sync_calls = [b for what, b in traffic if "weight" in what or "checksum" in what]
    assert len(sync_calls) >= 3 and sum(sync_calls) == 0  # the syncs ran and sent no tensor through the driver
    assert max(b for _, b in traffic) < model_bytes / 10  # the largest message: samples, not weights
    assert sum(b for _, b in traffic) < model_bytes  # not even one copy of the model over the whole run
    assert any(b > 0 for _, b in traffic)  # (the counting sees the samples)
