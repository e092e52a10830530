"""Small Triton helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def dot_acc(acc, a, b, IEEE: tl.constexpr):
    """acc + a @ b; IEEE picks exact fp32 products (fp32 inputs) over TF32."""
    if IEEE:
        acc += tl.dot(a, b, input_precision="ieee")
    else:
        acc += tl.dot(a, b)
    return acc
