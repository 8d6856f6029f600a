"""MeshLayout: what the model needs to know about the mesh it runs on, kept apart from ModelSpec.

A ModelSpec says what the model computes and is the same on every mesh; a MeshLayout says how the MoE
layer is laid over the mesh (parallel.layout) and how the layer stack is split into pipeline stages
(stored device by device, each stage padded to the longest; model/pipeline.py runs it).

With a circular schedule (parallel.pipeline_repeats = R > 1) the layers are cut into P x R virtual stages
dealt round-robin: virtual stage v runs on device v % P as its chunk v // P, so a microbatch goes round the
ring of devices R times. Device s stores its R chunks one after the other.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from skymoe_jax.model.spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    layout: str = "gshard"  # parallel.layout: gshard (expert axis also splits the batch) or edp
    # Layers per virtual stage, in the order a microbatch runs them, when the pipeline axis is > 1, else ():
    # one per device, or P x R of them under a circular schedule.
    stage_layers: tuple[int, ...] = ()
    repeats: int = 1  # parallel.pipeline_repeats: virtual stages (chunks) per device

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> MeshLayout:
        return cls(layout=c.parallel.layout, stage_layers=pipeline_stage_layers(c), repeats=c.parallel.pipeline_repeats)

    @property
    def pipelined(self) -> bool:
        return len(self.stage_layers) > 1

    @property
    def devices(self) -> int:
        """Pipeline stages in the mesh's sense: devices along the pipeline axis."""
        return len(self.stage_layers) // self.repeats

    def chunk_layers(self) -> np.ndarray:
        """[devices, repeats]: the layers of each device's chunks (virtual stage r x devices + s at [s, r])."""
        return np.asarray(self.stage_layers).reshape(self.repeats, self.devices).T

    def stored_layers(self, num_layers: int) -> int:
        """Length of the stored layer stack: num_layers, or virtual stages x the longest when pipelined."""
        return len(self.stage_layers) * max(self.stage_layers) if self.pipelined else num_layers

    def layer_slots(self, num_layers: int) -> np.ndarray:
        """For each layer (in order), its index in the stored stack: device s keeps its chunks r = 0, 1, ... at
        (s x repeats + r) x longest."""
        if not self.pipelined:
            return np.arange(num_layers)
        longest, p = max(self.stage_layers), self.devices
        return np.concatenate(
            [((v % p) * self.repeats + v // p) * longest + np.arange(n) for v, n in enumerate(self.stage_layers)]
        )

    def layer_places(self, spec: ModelSpec) -> tuple[tuple[int, int, int], ...]:
        """For each layer of `spec` (in order), where its parameters live: (stack, position in the stack's
        pattern, index on the stack's stored 'layers' axis), i.e.
        params["stacks"][stack]["blocks"]["layers"][position] at that index."""
        # A pipelined model is one stack of one-layer blocks (validated), so block r is layer r.
        slots = self.layer_slots(spec.num_layers)
        return tuple(
            (s, p, int(slots[r]) if self.pipelined else r)
            for s, (pattern, repeats) in enumerate(spec.stacks())
            for r in range(repeats)
            for p in range(len(pattern))
        )


def pipeline_stage_layers(c: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Layers per virtual pipeline stage (pipeline axis x parallel.pipeline_repeats of them):
    parallel.pipeline_stage_layers, or as even as possible (earlier stages take the remainder); () without a
    pipeline axis."""
    if c.parallel.mesh[0] <= 1:
        return ()
    if c.parallel.pipeline_stage_layers:
        return tuple(c.parallel.pipeline_stage_layers)
    stages = c.parallel.mesh[0] * c.parallel.pipeline_repeats
    base, extra = divmod(c.model.num_layers, stages)
    return tuple(base + (i < extra) for i in range(stages))
