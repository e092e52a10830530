"""Static cases for kernel modules that do not declare their own `STATIC_CASES`.

`bench/static.py` compiles, for every module in `pefomed.kernels`, the cases of its
`STATIC_CASES` (see bench/static.py's docstring for the protocol), and otherwise the entry named
after the module here. The cases belong beside the launchers they describe, so this registry is
only the stop-gap for a kernel module that cannot declare them yet: the gate ran from day one on
entries here for kernels/lora.py, kernels/nf4.py and kernels/visual_proj.py, and each was removed
when its module took over with its own STATIC_CASES (all three have). A kernel module with
neither fails `tests/bench/test_static.py::test_every_kernel_is_compiled`.

An entry is `"<module name>": function returning [StaticCase, ...]`, e.g.

    def my_op_cases():
        from pefomed.kernels import my_op
        return [StaticCase(name="my_op.fwd", kernel=my_op._fwd_kernel, args={...}, configs=[...])]

    REGISTRY = {"my_op": my_op_cases}
"""

from __future__ import annotations

from collections.abc import Callable

from pefomed.bench.static import StaticCase

# module name in pefomed.kernels -> its cases (used only while the module has no STATIC_CASES)
REGISTRY: dict[str, Callable[[], list[StaticCase]]] = {}
