"""Every seed a run uses, derived from ``training.seed`` in one place.

Each stream is a pure function of the run's seed and a counter (step, epoch, call, rank), so
two runs with one seed draw the same numbers and a changed seed changes every stream. The
strides are primes kept from the project's first runs, so earlier metrics reproduce exactly;
streams never share a value for small counters.

| stream | used by | value |
|---|---|---|
| :func:`rollout` | online sampling, one call of a step | ``seed * 7919 + step + call`` |
| :data:`EVALUATION_SAMPLING` | held-out sampling (initial and current policy alike) | ``424242`` |
| :func:`pairing` | tie-breaking when pairing samples | ``seed + step`` |
| :func:`minibatch_shuffle` | online mini-batch shuffling (``shuffle_minibatch``) | ``seed * 31 + step`` |
| :func:`epoch_order` | the data order of each epoch | ``seed + epoch`` |
| :func:`held_out_split` | ``data.eval_fraction``'s held-out rows | ``seed`` |
| :func:`data_parallel_rank` | per-DP-rank sampling streams in a worker | ``seed + 1_000_003 * dp_rank`` |
| :func:`request` | one request of an engine seeded per request (vLLM) | ``(seed * 10_007 + row) mod 2**63`` |
"""

from __future__ import annotations

ROLLOUT_STRIDE = 7919
MINIBATCH_STRIDE = 31
DP_RANK_STRIDE = 1_000_003
REQUEST_STRIDE = 10_007
#: One fixed seed for evaluation sampling: the initial and the current policy sample the same
#: held-out prompts with the same noise, so their RM scores compare policy with policy.
EVALUATION_SAMPLING = 424242


def rollout(seed: int, step: int, call: int = 0) -> int:
    """Sampling seed of inference call ``call`` of training step ``step``."""
    return seed * ROLLOUT_STRIDE + step + call


def pairing(seed: int, step: int) -> int:
    """Tie-breaking seed of step ``step``'s pairing (``tie_policy: random``)."""
    return seed + step


def minibatch_shuffle(seed: int, step: int) -> int:
    """Shuffling seed of step ``step``'s online mini-batches."""
    return seed * MINIBATCH_STRIDE + step


def epoch_order(seed: int, epoch: int) -> int:
    """Permutation seed of the data order in epoch ``epoch``."""
    return seed + epoch


def held_out_split(seed: int) -> int:
    """Seed of the held-out rows that ``data.eval_fraction`` takes from the training data."""
    return seed


def data_parallel_rank(seed: int, dp_rank: int) -> int:
    """A worker's sampling seed on data-parallel rank ``dp_rank`` (ranks draw different samples)."""
    return seed + DP_RANK_STRIDE * dp_rank


def request(seed: int, row: int) -> int:
    """Seed of request ``row`` of a sampling call seeded with ``seed`` (an engine that seeds each request,
    so a sample depends on its call and row, not on how the engine batches)."""
    return (seed * REQUEST_STRIDE + row) % 2**63
