"""TR-DPO's reference refresh (Gorbatovski et al. 2024, arXiv:2404.09656), online and offline.

Every ``algorithm.ref_update.interval`` steps the actor's weights go into the reference: whole (``hard``) or
mixed (``soft``: ref <- alpha x actor + (1 - alpha) x ref, per parameter, in fp32). They travel over the
weight-sync stream: on Ray a sync channel of its own (``ref``) between the actor's sending ranks and every
reference rank, resharded to the reference's TP/PP layout on arrival, never through the driver; in-process the
actor's bucket stream is handed to the reference in the same process. TRL's names: ``sync_ref_model`` (mode
other than ``none``), ``ref_model_mixup_alpha`` (alpha; ``hard`` is alpha 1), ``ref_model_sync_steps``
(interval).

A checkpoint of such a run holds the reference's weights (``reference/`` beside the actor's rank files, in the
reference's own layout) and ``reference_version``: a resumed run trains against the reference it had.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dpo_rl.checkpoint.training import REFERENCE_DIR
from dpo_rl.config.schema import RefUpdateConfig
from dpo_rl.errors import ConfigError
from dpo_rl.runtime.worker_group import wait_for

logger = logging.getLogger(__name__)


def join_sync_channel(actor, receivers, senders: int, channel: str) -> None:
    """Build ``channel``'s sync groups between the actor's sending ranks (one per pipeline stage, ``senders``) and
    every rank of the ``receivers`` group (a split actor's rollout ranks, or the reference's)."""
    address, port = actor.weight_sync_endpoint(channel)
    pending = [actor.call_async("join_weight_sync_as_sender", address, port, receivers.world_size, channel),
               receivers.call_async("join_weight_sync_as_receiver", address, port, senders, channel)]
    for p in pending:
        wait_for(p)


class ReferenceRefresh:
    """When and how a run's reference takes the actor's weights."""

    def __init__(self, settings: RefUpdateConfig, actor, ref, *, senders: int, verify: bool = False) -> None:
        """``actor`` / ``ref``: the worker groups; ``senders``: the actor's pipeline stages (one sync group each);
        ``verify``: compare the checksums of what was sent and received (Ray)."""
        self.settings, self.actor, self.ref = settings, actor, ref
        self.senders, self.verify = senders, verify
        #: the actor updates the reference's weights took in at the last refresh (0: the initial reference)
        self.version = 0

    @property
    def enabled(self) -> bool:
        return self.settings.mode != "none"

    @property
    def mix(self) -> float:
        """The actor's share of each refreshed weight."""
        return 1.0 if self.settings.mode == "hard" else self.settings.alpha

    def due(self, step: int) -> bool:
        """Whether the reference refreshes after step ``step``."""
        return self.enabled and step % self.settings.interval == 0

    def join(self) -> None:
        """Build the ``ref`` sync channel between the actor's sending ranks and the reference's ranks (Ray, once)."""
        if self.enabled and not self.ref.in_process:
            join_sync_channel(self.actor, self.ref, self.senders, "ref")

    def refresh(self, version: int) -> None:
        """Take the actor's weights (``version``: its updates so far) into the reference now."""
        if self.ref.in_process:
            self.ref.load_weight_stream(self.actor.local_weight_stream(), self.mix)
        else:
            sent, received = (wait_for(p) for p in [
                self.actor.call_async("send_weights", self.settings.bucket_mb, self.verify, "ref"),
                self.ref.call_async("receive_weights", self.verify, version, self.mix)])
            if sent != received:
                raise RuntimeError(f"reference refresh check failed: sent {sent[:12]} but received {received[:12]}")
        self.version = version

    def state(self) -> dict[str, Any]:
        """What a checkpoint's trainer state records: the reference's version (0: never refreshed)."""
        return {"reference_version": self.version}

    def save(self, directory: Path) -> None:
        """Write the reference's weights into the checkpoint being staged at ``directory``."""
        if self.enabled:
            self.ref.save_reference(str(directory))

    def restore(self, directory: Path, state: dict[str, Any]) -> None:
        """Load the reference a checkpoint holds. One without (its run never refreshed the reference) leaves the
        initial reference, which is what that run trained against; one written before checkpoints held the
        reference (no ``reference_version``) may have refreshed it, so a refreshing run refuses to resume it."""
        if not (Path(directory) / REFERENCE_DIR).is_dir():
            if self.enabled and "reference_version" not in state and state["step"] >= self.settings.interval:
                raise ConfigError([f"training.resume: {directory} does not record its reference (written before "
                                   "dpo_rl's checkpoints held a refreshed reference), and this run refreshes it "
                                   f"(algorithm.ref_update.mode={self.settings.mode!r}), so it would train against the "
                                   "initial reference; start over (training.resume=none) or set "
                                   "algorithm.ref_update.mode: none"])
            return
        if not self.enabled:
            logger.warning("%s holds a reference refreshed %d times (TR-DPO), but algorithm.ref_update.mode is none: "
                           "the reference is its initial load again", directory, state.get("reference_version", 0))
            return
        self.ref.load_reference(str(directory))
        self.version = state.get("reference_version", 0)

    def metrics(self) -> dict[str, float]:
        """``reference/version``: the actor updates the reference holds (with a refresh configured)."""
        return {"reference/version": float(self.version)} if self.enabled else {}
