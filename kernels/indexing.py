"""Index arithmetic shared by the Triton kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rows64(offs):
    """Non-negative int32 indices widened to int64 for pointer arithmetic by zero-extension.

    Sign extension (``offs.to(tl.int64)``) leaves the high words as values the compiler keeps live
    from the loads before a loop to the stores after it, and ptxas spilled them on sm_90 (8-12 bytes
    in the exact-fp32 configs); zero-extended high words are constants."""
    return offs.to(tl.uint32).to(tl.int64)
