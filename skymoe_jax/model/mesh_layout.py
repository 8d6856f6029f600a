"""MeshLayout: what the model needs to know about the mesh it runs on, kept apart from ModelSpec.

A ModelSpec says what the model computes and is the same on every mesh; a MeshLayout says how the MoE
layer is laid over the mesh (parallel.layout) and how the layer stack is split into pipeline stages
(stored stage by stage, each stage padded to the longest; model/pipeline.py runs it).
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from skymoe_jax.model.spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    layout: str = "gshard"  # parallel.layout: gshard (expert axis also splits the batch) or edp
    stage_layers: tuple[int, ...] = ()  # layers per pipeline stage when the pipeline axis is > 1, else ()

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> MeshLayout:
        return cls(layout=c.parallel.layout, stage_layers=pipeline_stage_layers(c))

    @property
    def pipelined(self) -> bool:
        return len(self.stage_layers) > 1

    def stored_layers(self, num_layers: int) -> int:
        """Length of the stored layer stack: num_layers, or stages x the longest stage when pipelined."""
        return len(self.stage_layers) * max(self.stage_layers) if self.pipelined else num_layers

    def layer_slots(self, num_layers: int) -> np.ndarray:
        """For each layer (in order), its index in the stored stack."""
        if not self.pipelined:
            return np.arange(num_layers)
        longest = max(self.stage_layers)
        return np.concatenate([s * longest + np.arange(n) for s, n in enumerate(self.stage_layers)])

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
    """Layers per pipeline stage: parallel.pipeline_stage_layers, or as even as possible (earlier
    stages take the remainder); () without a pipeline axis."""
    stages = c.parallel.mesh[0]
    if stages <= 1:
        return ()
    if c.parallel.pipeline_stage_layers:
        return tuple(c.parallel.pipeline_stage_layers)
    base, extra = divmod(c.model.num_layers, stages)
    return tuple(base + (i < extra) for i in range(stages))
