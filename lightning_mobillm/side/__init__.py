"""Side networks trained on the server from the backbone's activations."""

from lightning_mobillm.side.parallel_adapters import (
    BottleneckAdapter,
    ParallelAdapterSideNetwork,
    make_activation,
    rms_normalize,
)

__all__ = ["BottleneckAdapter", "ParallelAdapterSideNetwork", "make_activation", "rms_normalize"]
