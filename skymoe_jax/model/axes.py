"""The mesh axes the model's sharded code names (shard_map over the MoE layer, attention kernels, the
pipeline schedule), and which of them carry the batch in each layout. parallel/mesh.py builds meshes
with these axes and maps parameters onto them."""

from __future__ import annotations

AXES = ("pipeline", "data", "expert")


def batch_axes(layout: str) -> tuple[str, ...]:
    """gshard splits the batch over data x expert; EDP over data only (the expert axis is tensor-parallel)."""
    return ("data", "expert") if layout == "gshard" else ("data",)
