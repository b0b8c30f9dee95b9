"""Which tensors are plain dense memory, whose bytes can be copied or shared as they are.

The background saver copies such tensors into its buffers byte for byte, and incremental saves
store their bytes once; anything else (quantized, nested, lazily conjugated or negated, meta) is
left to ``torch.save`` and ``copy.deepcopy``, which know its layout.

Owns: that one predicate. Must not: copy, hash or write anything.
"""

from __future__ import annotations

import torch

__all__ = ["is_dense"]


def is_dense(t: torch.Tensor) -> bool:
    """True for a strided tensor with real memory whose stored bytes are its values."""
    return (
        t.layout == torch.strided
        and t.device.type != "meta"
        and not t.is_quantized
        and not t.is_nested
        and not t.is_conj()
        and not t.is_neg()
    )
