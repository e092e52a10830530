"""Every test under tests/kernels runs its Triton kernels with the GPU's bf16 semantics.

The `bf16_interpreter` fixture (tests/kernels/bf16_interpreter.py) is autouse here: under
TRITON_INTERPRET=1 it patches the interpreter so that bf16 `tl.dot` computes in fp32 from the real
bf16 values and casts to bf16 round to nearest even, as on the GPU; on a CUDA machine it does
nothing. A kernel test therefore passes bf16 tensors straight in and compares with a float64
reference; no kernel upcasts its operands for the interpreter's sake.
"""

import pytest

from .bf16_interpreter import bf16_interpreter  # noqa: F401  (registers the fixture)


@pytest.fixture(autouse=True)
def _bf16_on_gpu_semantics(bf16_interpreter):  # noqa: F811
    yield bf16_interpreter
