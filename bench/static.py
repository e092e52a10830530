"""The compile gate: every Triton kernel compiled for sm_80 (A100), sm_86 (A40) and sm_90a (H100),
on a machine without a GPU, and checked.

    python -m pefomed.bench.static                 # all kernels, all archs; exit 1 on a violation
    pefomed bench static --arch 86 --only nf4      # a subset
    pefomed bench static --json out.json --jobs 2  # the full report as JSON (tests/bench/test_static.py)
    make static

Usage for kernel authors (kernels/*.py). Declare what the launchers compile, at module level:

    def STATIC_CASES():                       # a function: bench is imported only by the gate
        from pefomed.bench.static import Ptr, StaticCase
        return [
            StaticCase(
                name="rms_norm.fwd",
                kernel=_rms_norm_fwd_kernel,   # a JITFunction, an Autotuner, or a zero-arg callable
                args={"x": Ptr(torch.bfloat16), "w": Ptr(torch.float32), "n_rows": 8192, "n_cols": 4096,
                      "stride_x": 4096, "eps": 1e-6, "HAS_WEIGHT": True},   # every non-config argument
                configs=[triton.Config({"BLOCK": 4096}, num_warps=8)],      # None: the autotuner's
                mma=None,            # "bf16": needs bf16 MMA (mma.sync/wgmma .bf16), never tf32
                streaming=True,      # needs 128-bit global loads (ld.global.v4.b32, cp.async 16, TMA)
                int64=True,          # grid/loop-scaled index x runtime size products must be 64-bit
            ),
        ]

`args` holds realistic launch values: the gate specializes exactly as a launch would (a pointer
16-byte aligned, an int divisible by 16 gets `tt.divisibility`, an int equal to 1 becomes a
constant), so give the engine's shapes and strides (4096, not 1000) and the engine's dtypes (bf16
activations, fp32 adapters, uint8 NF4 codes). One case per distinct constexpr variant that the
launchers use (e.g. dropout on/off). Kernels whose module has no STATIC_CASES get theirs from
`bench/static_cases.py`; a module's own STATIC_CASES replaces those.

Configs that fail an arch are excluded from that arch at run time through
`kernels.common.configs_for` / `kernels.common.prune_for_device(exclude)` (an autotuner's
`prune_configs_by={"early_config_prune": prune_for_device(EXCLUDE)}`); the gate reads the
exclusions from the autotuner (or `StaticCase.exclude`), checks that every config left on an arch
passes, that each arch keeps at least one, and prints the `EXCLUDE` entries a failing config needs.

Per (case, config, arch) it reports registers and spill bytes (`ptxas -v`, Triton's own ptxas
for the exact flags Triton uses), shared memory (Triton's dynamic allocation + static), the MMA
instructions (PTX), the global-load widths (PTX), and the 32-bit products of a scaled index with a
runtime size/stride that reach an address (TTIR). Checks:
- no spill stores or loads;
- shared memory <= the arch's per-block limit (sm_80 163 KB, sm_86 99 KB, sm_90 227 KB);
- `mma="bf16"`: at least one bf16 MMA and no tf32/fp16 MMA; any case: no tf32 MMA where a bf16
  operand is loaded;
- `streaming=True`: a 128-bit global load (or 16-byte cp.async / TMA);
- `int64=True`: no `i32` multiply of a program-id-, loop- or load-derived index by a runtime int
  argument on the way to an address (such a product passes 2^31 on large tensors).

The compiled artifacts (PTX, TTIR, the ptxas log, Triton's shared-memory size) are cached on disk
keyed by the kernel's source hash (Triton's `cache_key`, which covers the `@triton.jit` functions
it calls), the specialization, the options, the arch and the Triton version:
`$PEFOMED_STATIC_CACHE`, default `~/.cache/pefomed/static` (CI: cache that folder, keyed on
kernels/*.py). The analyses run on every read, so a warm run takes seconds and a changed check
needs no recompile.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import logging
import os
import pkgutil
import re
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("pefomed.bench.static")  # also under `python -m`, where __name__ is __main__

CACHE_VERSION = 1  # bump when the cached artifacts change form (the analyses run on every read)
ARCHS = (80, 86, 90)
ARCH_NAMES = {80: "sm_80", 86: "sm_86", 90: "sm_90a"}
ARCH_GPUS = {80: "A100", 86: "A40", 90: "H100"}
# Shared memory per block (the opt-in maximum), CUDA programming guide's compute-capability table.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}


# --- what a kernel module declares --------------------------------------------------------------


def Ptr(dtype: Any, aligned: bool = True) -> Any:
    """A pointer argument of torch dtype `dtype` (16-byte aligned unless `aligned=False`)."""
    from triton.runtime.jit import MockTensor

    if aligned:
        return MockTensor(dtype)

    class _Unaligned(MockTensor):
        @staticmethod
        def data_ptr():
            return 2

    return _Unaligned(dtype)


@dataclasses.dataclass(frozen=True)
class StaticCase:
    """One kernel as a launcher compiles it; see the module docstring."""

    name: str
    kernel: Any
    args: Mapping[str, Any]
    configs: Sequence[Any] | Callable[[int], Sequence[Any]] | None = None
    mma: str | None = None
    streaming: bool = False
    int64: bool = True
    archs: tuple[int, ...] = ARCHS
    exclude: Mapping[int, Collection[str]] | None = None
    note: str = ""

    def __post_init__(self):
        if self.mma not in (None, "bf16"):
            raise ValueError(f"StaticCase {self.name}: mma={self.mma!r}, expected None or 'bf16'")
        unknown = set(self.archs) - set(ARCHS)
        if unknown:
            raise ValueError(f"StaticCase {self.name}: archs {sorted(unknown)} not in {list(ARCHS)}")


def _unwrap(kernel: Any) -> Any:
    """(JITFunction, autotuner or None) behind an Autotuner / Heuristics / zero-arg factory."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, (JITFunction, Autotuner)) and callable(kernel) and not hasattr(kernel, "fn"):
        kernel = kernel()
    tuner = None
    while not isinstance(kernel, JITFunction):
        if isinstance(kernel, Autotuner) and tuner is None:
            tuner = kernel
        inner = getattr(kernel, "fn", None)
        if inner is None:
            raise TypeError(
                f"{kernel!r} is not a Triton kernel; is TRITON_INTERPRET=1 set? the gate compiles for GPUs"
            )
        kernel = inner
    return kernel, tuner


def config_id(cfg: Any) -> str:
    """The name `kernels.common.configs_for` excludes a config by (the same function)."""
    from pefomed.kernels.common import config_id as _config_id

    return _config_id(cfg)


def case_configs(case: StaticCase, arch: int) -> list[Any]:
    import triton

    _, tuner = _unwrap(case.kernel)
    if case.configs is None:
        if tuner is None:
            return [triton.Config({})]
        return list(tuner.configs)
    return list(case.configs(arch) if callable(case.configs) else case.configs)


def case_exclude(case: StaticCase) -> dict[int, set[str]]:
    if case.exclude is not None:
        return {a: set(v) for a, v in case.exclude.items()}
    _, tuner = _unwrap(case.kernel)
    pruner = getattr(tuner, "early_config_prune", None) if tuner is not None else None
    return {a: set(v) for a, v in getattr(pruner, "exclude", {}).items()}


# --- discovery ----------------------------------------------------------------------------------


def kernel_modules() -> list[str]:
    import pefomed.kernels as pkg

    return sorted(f"pefomed.kernels.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def discover(extra_modules: Sequence[str] = ()) -> list[StaticCase]:
    """Every case: each kernel module's STATIC_CASES, else bench/static_cases.py's for it."""
    from pefomed.bench import static_cases

    cases: list[StaticCase] = []
    for name in kernel_modules():
        module = importlib.import_module(name)
        own = getattr(module, "STATIC_CASES", None)
        short = name.rsplit(".", 1)[1]
        if own is not None:
            cases += list(own() if callable(own) else own)
        elif short in static_cases.REGISTRY:
            cases += list(static_cases.REGISTRY[short]())
    for name in extra_modules:
        own = importlib.import_module(name).STATIC_CASES
        cases += list(own() if callable(own) else own)
    names = [c.name for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate static case names: {dupes}")
    return cases


def uncovered_kernels(cases: Iterable[StaticCase]) -> list[str]:
    """Module-level Triton kernels (`*_kernel`) in pefomed.kernels that no case compiles."""
    from triton.runtime.jit import JITFunction

    covered = {id(_unwrap(c.kernel)[0]) for c in cases}
    missing = []
    for name in kernel_modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            fn = value
            while fn is not None and not isinstance(fn, JITFunction):
                fn = getattr(fn, "fn", None)
            if isinstance(fn, JITFunction) and fn.__name__.endswith("_kernel") and fn.__module__ == name:
                if id(fn) not in covered:
                    missing.append(f"{name}.{fn.__name__}")
    return sorted(set(missing))


# --- analysis of the compiled code ---------------------------------------------------------------

_MMA_RE = re.compile(r"\b(mma\.sync\.aligned\.[\w.]+|wgmma\.mma_async(?:\.sp)?\.sync\.aligned\.[\w.]+)")
_MMA_TYPES = ("bf16", "f16", "tf32", "e4m3", "e5m2", "s8", "u8", "f64", "f8f6f4")


def mma_kinds(ptx: str) -> dict[str, int]:
    """{operand type: count} of the MMA instructions (mma.sync / wgmma) in the PTX."""
    kinds: dict[str, int] = {}
    for ins in _MMA_RE.findall(ptx):
        parts = ins.split(".")
        # the accumulator type comes first (f32/f16/s32) then the operand types
        operand = next((p for p in parts[4:] if p in _MMA_TYPES and p != "f16"), None)
        if operand is None:
            # "f16" as an operand only when the accumulator is f32 (…f32.f16.f16.f32) or f16 (…f16.f16.f16.f16)
            operand = "f16" if "f16" in parts[4:] else "?"
        kinds[operand] = kinds.get(operand, 0) + 1
    return kinds


_LD_RE = re.compile(r"\bld\.global((?:\.[\w:]+)*)\s")
# cp.async.{ca,cg}.shared.global [dst], [src], cp-size{, src-size}; the size is decimal or hex
_CPASYNC_RE = re.compile(r"\bcp\.async\.(?:ca|cg)\.shared\.global(?:\.[\w:]+)*\s*\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


def load_widths(ptx: str) -> dict[str, int]:
    """{width in bits: count} of global loads (ld.global, cp.async; 'tma' for bulk tensor copies)."""
    widths: dict[str, int] = {}

    def add(key: str) -> None:
        widths[key] = widths.get(key, 0) + 1

    for quals in _LD_RE.findall(ptx):
        vec, bits = 1, None
        for q in quals.split(".")[1:]:
            if q in ("v2", "v4", "v8"):
                vec = int(q[1:])
            m = re.fullmatch(r"[bfsu](8|16|32|64|128)", q)
            if m:
                bits = int(m.group(1))
        if bits is not None:
            add(str(vec * bits))
    for nbytes in _CPASYNC_RE.findall(ptx):
        add(str(int(nbytes, 0) * 8))
    for _ in re.finditer(r"\bcp\.async\.bulk\.tensor", ptx):
        add("tma")
    return widths


def has_128bit_loads(widths: Mapping[str, int]) -> bool:
    return any(k == "tma" or int(k) >= 128 for k in widths)


_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log_text: str) -> dict[str, int]:
    props = _PTXAS_PROPS.search(log_text)
    used = _PTXAS_USED.search(log_text)
    if not (props and used):
        raise RuntimeError(f"unexpected ptxas -v output:\n{log_text}")
    return {
        "stack": int(props.group(1)),
        "spill_stores": int(props.group(2)),
        "spill_loads": int(props.group(3)),
        "regs": int(used.group(1)),
        "smem_static": int(used.group(2) or 0),
    }


# TTIR: `%name = op operands : type loc(#locN)`; function arguments `%name: i32`.
_DEF_RE = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_VAL_RE = re.compile(r"%[\w.$-]+")
_LOC_DEF_RE = re.compile(r"^(#loc\d*)\s*=\s*loc\((.*)\)\s*$")
_FOR_RE = re.compile(r"scf\.for\s+(%[\w.$-]+)\s*=")
_ITER_RE = re.compile(r"(%[\w.$-]+)\s*=\s*(%[\w.$-]+)")


def _strip_loc(text: str) -> tuple[str, str | None]:
    m = re.search(r"\sloc\((#loc\d*|[^)]*)\)\s*(\{)?\s*$", text)
    if not m:
        return text, None
    return text[: m.start()] + (" {" if m.group(2) else ""), m.group(1)


def _resolve_locs(ttir: str) -> dict[str, str]:
    raw = {}
    for line in ttir.splitlines():
        m = _LOC_DEF_RE.match(line.strip())
        if m:
            raw[m.group(1)] = m.group(2)
    resolved: dict[str, str] = {}

    def resolve(ref: str, depth: int = 0) -> str:
        if ref in resolved or depth > 50:
            return resolved.get(ref, "?")
        body = raw.get(ref, "")
        m = re.search(r'"([^"]+)":(\d+)', body)
        if m:
            out = f"{Path(m.group(1)).name}:{m.group(2)}"
        else:
            inner = re.findall(r"#loc\d*", body)
            out = resolve(inner[-1], depth + 1) if inner else "?"
        resolved[ref] = out
        return out

    for ref in raw:
        resolve(ref)
    return resolved


def _element_type(ty: str) -> str:
    """'i32' for `i32` and `tensor<128x1xi32>`."""
    ty = ty.strip()
    if ty.startswith("tensor<") and ty.endswith(">"):
        return ty[len("tensor<") : -1].split("x")[-1]
    return ty


def int32_index_products(ttir: str) -> list[str]:
    """`i32` multiplies of a scaled index by a runtime int argument that reach an address.

    A value is *scaled* when it depends on tl.program_id, a loop induction variable or a loaded
    value (it grows with the problem), and *runtime* when it depends on an integer kernel argument
    (a size or stride). Their product in 32 bits overflows once it passes 2^31 (a 2^31-element
    tensor is 4 GiB of bf16: M=65536 tokens x 32768 features); the fix is `.to(tl.int64)` on the
    index before the multiply. Products of a block-local range (tl.arange) with a stride are
    bounded by the block size and are not reported.
    """
    locs = _resolve_locs(ttir)
    defs: dict[str, tuple[str, list[str], str, str | None]] = {}  # name -> (op, operands, type, loc)
    runtime: set[str] = set()
    scaled_roots: set[str] = set()
    alias: dict[str, list[str]] = {}
    addptr_offsets: list[str] = []
    for line in ttir.splitlines():
        stripped = line.strip()
        if stripped.startswith("tt.func"):
            runtime.update(re.findall(r"(%[\w.$-]+):\s*i(?:32|64)\b", stripped))
            continue
        body, loc = _strip_loc(stripped)
        m = _DEF_RE.match(body)
        if not m:
            continue
        name, op, rest = m.groups()
        if op == "scf.for":
            fm = _FOR_RE.search(body)
            if fm:
                scaled_roots.add(fm.group(1))
            it = re.search(r"iter_args\((.*?)\)\s*->", body)
            if it:
                for arg, init in _ITER_RE.findall(it.group(1)):
                    alias[arg] = [init]
            continue
        rest_types = rest.rsplit(" : ", 1)
        operands = _VAL_RE.findall(rest_types[0])
        ty = rest_types[1] if len(rest_types) > 1 else ""
        defs[name] = (op, operands, ty, loc)
        if op in ("tt.get_program_id", "tt.load"):
            scaled_roots.add(name)
        if op == "tt.addptr" and len(operands) >= 2:
            addptr_offsets.append(operands[1])

    memo: dict[tuple[str, str], bool] = {}

    def depends(value: str, kind: str, seen: frozenset = frozenset()) -> bool:
        key = (value, kind)
        if key in memo:
            return memo[key]
        if value in seen:
            return False
        roots = runtime if kind == "runtime" else scaled_roots
        if value in roots:
            memo[key] = True
            return True
        if kind == "scaled" and defs.get(value, ("",))[0] == "tt.load":
            memo[key] = True
            return True
        parents = alias.get(value, []) + (defs[value][1] if value in defs else [])
        out = any(depends(p, kind, seen | {value}) for p in parents)
        memo[key] = out
        return out

    found: dict[str, str] = {}
    visited: set[str] = set()
    stack = list(addptr_offsets)
    while stack:
        value = stack.pop()
        if value in visited:
            continue
        visited.add(value)
        if value not in defs:
            stack += alias.get(value, [])
            continue
        op, operands, ty, loc = defs[value]
        if op == "tt.load":
            continue  # the address of a load is checked at its own addptr
        if op == "arith.muli" and _element_type(ty) == "i32" and len(operands) == 2:
            a, b = operands
            if (depends(a, "scaled") and depends(b, "runtime") and not depends(b, "scaled")) or (
                depends(b, "scaled") and depends(a, "runtime") and not depends(a, "scaled")
            ):
                where = locs.get(loc, loc or "?") if loc else "?"
                found[value] = f"{where}: {value} = {a} * {b} ({ty.strip()})"
        stack += operands + alias.get(value, [])
    return sorted(found.values())


# --- compiling one (case, config, arch) ---------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("PEFOMED_STATIC_CACHE", Path.home() / ".cache" / "pefomed" / "static"))


@contextlib.contextmanager
def _ptxas_log():
    """Make Triton run ptxas (never its cache) and capture the `ptxas -v` log it prints."""
    from triton import knobs

    saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved


def _run_ptxas(ptx: str, arch: int) -> str:
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
               str(src), "-o", str(Path(d) / "k.o")]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _prepare(case: StaticCase, cfg: Any, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, _ = _unwrap(case.kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**case.args, **cfg.all_kwargs()}
    missing = [p for p in fn.arg_names if p not in kwargs and fn.signature.parameters[p].default is fn.signature.parameters[p].empty]
    if missing:
        raise TypeError(f"static case {case.name}: no value for {missing} (args + config)")
    bound, spec, opts = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    src = ASTSource(fn, signature, constexprs, attrs)
    opt_dict = {k: v for k, v in options.__dict__.items() if k != "extern_libs"}
    key = json.dumps(
        [CACHE_VERSION, triton.__version__, fn.cache_key, sorted(signature.items()),
         sorted((str(k), repr(v)) for k, v in constexprs.items()), sorted((str(k), repr(v)) for k, v in attrs.items()),
         sorted((k, repr(v)) for k, v in opt_dict.items()), arch],
        sort_keys=True,
    )  # fmt: skip
    return fn, target, src, options, hashlib.sha256(key.encode()).hexdigest()


def _analyse(artifacts: Mapping[str, Any], signature: Mapping[str, str]) -> dict[str, Any]:
    """The facts the checks use, from the compiled artifacts (re-run on every gate run, so a
    change of the analysis never needs a recompile)."""
    ptxas = parse_ptxas(artifacts["ptxas_log"])
    return {
        "kernel": artifacts["kernel"],
        "regs": ptxas["regs"],
        "spill_stores": ptxas["spill_stores"],
        "spill_loads": ptxas["spill_loads"],
        "stack": ptxas["stack"],
        "smem": int(artifacts["shared"]) + ptxas["smem_static"],
        "mma": mma_kinds(artifacts["ptx"]),
        "loads": load_widths(artifacts["ptx"]),
        "bf16_pointers": any(str(v).startswith("*bf16") for v in signature.values()),
        "int32_products": int32_index_products(artifacts["ttir"]),
        "compile_s": artifacts["compile_s"],
    }


def compile_report(case: StaticCase, cfg: Any, arch: int, use_cache: bool = True) -> dict[str, Any]:
    """The compiled facts of one (case, config, arch); the PTX, TTIR and ptxas log come from the
    disk cache when the kernel source and its specialization are unchanged."""
    import gzip

    import triton

    fn, target, src, options, key = _prepare(case, cfg, arch)
    path = cache_dir() / key[:2] / f"{key}.json.gz"
    if use_cache and path.exists():
        try:
            artifacts = json.loads(gzip.decompress(path.read_bytes()))
            return _analyse(artifacts, src.signature) | {"cached": True}
        except (OSError, EOFError, ValueError, KeyError):
            pass  # a torn or old cache file is recompiled
    t0 = time.perf_counter()
    with _ptxas_log() as buf:
        compiled = triton.compile(src, target=target, options=options.__dict__)
    log_text = buf.getvalue()
    if "spill stores" not in log_text:
        log_text = _run_ptxas(compiled.asm["ptx"], arch)
    artifacts = {
        "kernel": f"{fn.module}.{fn.__name__}",
        "ptx": compiled.asm["ptx"],
        "ttir": compiled.asm["ttir"],
        "ptxas_log": log_text,
        "shared": int(compiled.metadata.shared),
        "compile_s": round(time.perf_counter() - t0, 2),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(gzip.compress(json.dumps(artifacts).encode(), compresslevel=6))
    os.replace(tmp, path)  # atomic: concurrent gates never read half a file
    return _analyse(artifacts, src.signature) | {"cached": False}


def violations(case: StaticCase, report: Mapping[str, Any], arch: int) -> list[str]:
    out = []
    if report["spill_stores"] or report["spill_loads"]:
        out.append(f"spills {report['spill_stores']} B stored / {report['spill_loads']} B loaded ({report['regs']} regs)")
    if report["smem"] > SMEM_LIMIT[arch]:
        out.append(f"shared memory {report['smem'] / 1024:.1f} KB > {SMEM_LIMIT[arch] // 1024} KB ({ARCH_GPUS[arch]})")
    kinds = report["mma"]
    if case.mma == "bf16":
        if not kinds.get("bf16"):
            out.append(f"no bf16 MMA (MMA kinds: {kinds or 'none'})")
        others = sorted(k for k in kinds if k != "bf16")
        if others:
            out.append(f"non-bf16 MMA {others} in a bf16 kernel")
    elif kinds.get("tf32") and report["bf16_pointers"]:
        out.append("tf32 MMA in a kernel with bf16 operands (an fp32 upcast before tl.dot)")
    if case.streaming and not has_128bit_loads(report["loads"]):
        out.append(f"no 128-bit global loads (widths: {report['loads']})")
    if case.int64 and report["int32_products"]:
        out.append("32-bit index products: " + "; ".join(report["int32_products"]))
    return out


# --- self-check: kernels that must fail (and pass) each check ------------------------------------


def _selfcheck_kernels() -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def matmul_kernel(a, b, c, M, N, K, stride_am, stride_bk, stride_cm,
                      UPCAST: tl.constexpr, WIDE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        if WIDE:
            rows = rm.to(tl.int64)
        else:
            rows = rm
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            x = tl.load(a + rows[:, None] * stride_am + (k0 + rk)[None, :])
            y = tl.load(b + (k0 + rk).to(tl.int64)[:, None] * stride_bk + rn[None, :])
            if UPCAST:  # the interpreter workaround the gate must reject: TF32 MMA on the GPU
                acc += tl.dot(x.to(tl.float32), y.to(tl.float32))
            else:
                acc += tl.dot(x, y)
        tl.store(c + rows[:, None] * stride_cm + rn[None, :], acc.to(c.dtype.element_ty))

    @triton.jit
    def copy_kernel(x, y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + offs, tl.load(x + offs, mask=offs < n), mask=offs < n)

    @triton.jit
    def spill_kernel(x, y, BLOCK: tl.constexpr):
        # BLOCK fp32 values per one-warp program stay live across the reduction: BLOCK / 32
        # registers a thread, far over the 255 ptxas may use
        r = tl.arange(0, BLOCK)
        v = tl.load(x + r)
        tl.store(y + r, v / tl.sum(v * v, axis=0))

    return {"matmul": matmul_kernel, "copy": copy_kernel, "spill": spill_kernel}


def selfcheck_cases() -> list[tuple[StaticCase, str | None]]:
    """(case, the violation it must produce, None: must pass), compiled for sm_80 only."""
    import torch
    import triton

    k = _selfcheck_kernels()
    bf16 = torch.bfloat16
    mm = {"a": Ptr(bf16), "b": Ptr(bf16), "c": Ptr(bf16), "M": 4096, "N": 4096, "K": 4096,
          "stride_am": 4096, "stride_bk": 4096, "stride_cm": 4096}  # fmt: skip
    tile = [triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=4, num_stages=3)]
    big = [triton.Config({"BM": 256, "BN": 256, "BK": 128}, num_warps=8, num_stages=4)]
    copy_cfg = [triton.Config({"BLOCK": 1024}, num_warps=4)]
    only80 = (80,)
    return [
        (StaticCase("selfcheck.good_matmul", k["matmul"], {**mm, "UPCAST": False, "WIDE": True}, tile, "bf16", True, True, only80), None),
        (StaticCase("selfcheck.upcast", k["matmul"], {**mm, "UPCAST": True, "WIDE": True}, tile, "bf16", False, True, only80), "non-bf16 MMA"),
        (StaticCase("selfcheck.int32_rows", k["matmul"], {**mm, "UPCAST": False, "WIDE": False}, tile, "bf16", False, True, only80), "32-bit index products"),
        (StaticCase("selfcheck.smem", k["matmul"], {**mm, "UPCAST": False, "WIDE": True}, big, "bf16", False, True, only80), "shared memory"),
        (StaticCase("selfcheck.copy_aligned", k["copy"], {"x": Ptr(bf16), "y": Ptr(bf16), "n": 1 << 20}, copy_cfg, None, True, True, only80), None),
        (StaticCase("selfcheck.copy_unaligned", k["copy"], {"x": Ptr(bf16, aligned=False), "y": Ptr(bf16), "n": 1 << 20}, copy_cfg, None, True, True, only80), "no 128-bit global loads"),
        (StaticCase("selfcheck.spill", k["spill"], {"x": Ptr(torch.float32), "y": Ptr(torch.float32)},
                    [triton.Config({"BLOCK": 16384}, num_warps=1)], None, False, True, only80), "spills"),
    ]  # fmt: skip


def run_selfcheck(use_cache: bool = True) -> list[str]:
    """Problems with the gate itself: a known-bad kernel that passes a check, or a good one that fails."""
    problems = []
    for case, expected in selfcheck_cases():
        t0 = time.perf_counter()
        report = compile_report(case, case_configs(case, 80)[0], 80, use_cache)
        found = violations(case, report, 80)
        log.info("selfcheck %s: %.1f s%s", case.name, time.perf_counter() - t0, " (cached)" if report["cached"] else "")
        if expected is None and found:
            problems.append(f"{case.name}: expected to pass, got {found}")
        if expected is not None and not any(v.startswith(expected) for v in found):
            problems.append(f"{case.name}: expected '{expected}...', got {found or 'no violation'}")
    return problems


# --- running the gate ---------------------------------------------------------------------------

_WORKER_CASES: dict[str, StaticCase] | None = None


def _worker_init(extra_modules: Sequence[str]) -> None:
    global _WORKER_CASES
    logging.basicConfig(level=logging.WARNING)
    _WORKER_CASES = {c.name: c for c in discover(extra_modules)}


def _worker_task(task: tuple[str, int, int, bool]) -> dict[str, Any]:
    name, index, arch, use_cache = task
    assert _WORKER_CASES is not None
    case = _WORKER_CASES[name]
    cfg = case_configs(case, arch)[index]
    try:
        report = compile_report(case, cfg, arch, use_cache)
        report["violations"] = violations(case, report, arch)
    except Exception as e:  # a kernel that does not compile for an arch fails that arch
        report = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
        report["violations"] = [f"does not compile: {report['error']}"]
    return report


def run_gate(
    archs: Sequence[int] = ARCHS,
    only: str | None = None,
    jobs: int = 1,
    use_cache: bool = True,
    extra_modules: Sequence[str] = (),
) -> dict[str, Any]:
    cases = discover(extra_modules)
    selected = [c for c in cases if only is None or only in c.name]
    tasks, meta = [], []
    for case in selected:
        exclude = case_exclude(case)
        for arch in archs:
            if arch not in case.archs:
                continue
            for i, cfg in enumerate(case_configs(case, arch)):
                tasks.append((case.name, i, arch, use_cache))
                cid = config_id(cfg)
                meta.append({"case": case.name, "config": cid, "arch": arch, "excluded": cid in exclude.get(arch, set())})
    t0 = time.perf_counter()
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init, initargs=(tuple(extra_modules),)) as pool:
            reports = list(pool.map(_worker_task, tasks))
    else:
        _worker_init(extra_modules)
        reports = [_worker_task(t) for t in tasks]
    rows = [m | r for m, r in zip(meta, reports, strict=True)]
    summary = []
    for case in selected:
        for arch in archs:
            if arch not in case.archs:
                continue
            mine = [r for r in rows if r["case"] == case.name and r["arch"] == arch]
            kept = [r for r in mine if not r["excluded"]]
            summary.append({
                "case": case.name, "arch": arch,
                "configs": len(mine), "kept": len(kept),
                "kept_passing": sum(not r["violations"] for r in kept),
                "kept_failing": [r["config"] for r in kept if r["violations"]],
                "excluded_passing": [r["config"] for r in mine if r["excluded"] and not r["violations"]],
            })  # fmt: skip
    return {
        "archs": list(archs),
        "smem_limit": {str(a): SMEM_LIMIT[a] for a in archs},
        "rows": rows,
        "summary": summary,
        "uncovered": uncovered_kernels(cases) if only is None else [],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def failures(result: Mapping[str, Any]) -> list[str]:
    """Everything that fails the gate, one line each."""
    out = [f"{k}: no static case compiles this kernel" for k in result["uncovered"]]
    for s in result["summary"]:
        arch = ARCH_NAMES[s["arch"]]
        if s["kept"] == 0:
            out.append(f"{s['case']} {arch}: every config is excluded; each arch needs at least one")
        for cid in s["kept_failing"]:
            row = next(r for r in result["rows"] if r["case"] == s["case"] and r["arch"] == s["arch"] and r["config"] == cid)
            out.append(f"{s['case']} {arch} [{cid}]: " + "; ".join(row["violations"]))
    return out


def _format_table(result: Mapping[str, Any]) -> str:
    head = f"{'case':<34} {'arch':<7} {'config':<44} {'regs':>4} {'spill':>6} {'smem KB':>7} {'mma':<10} {'loads (bits:n)':<22} verdict"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['case']:<34} {ARCH_NAMES[r['arch']]:<7} {r['config']:<44} {r['error']}")
            continue
        mma = ",".join(f"{k}" for k in sorted(r["mma"])) or "-"
        loads = ",".join(f"{k}:{v}" for k, v in sorted(r["loads"].items(), key=lambda kv: (kv[0] == "tma", kv[0].zfill(4)), reverse=True))
        verdict = "ok" if not r["violations"] else "FAIL: " + "; ".join(r["violations"])
        if r["excluded"]:
            verdict = "excluded" + ("" if r["violations"] else " (passes: could be re-enabled)") + (
                "" if not r["violations"] else f" ({'; '.join(r['violations'])})"
            )
        lines.append(
            f"{r['case']:<34} {ARCH_NAMES[r['arch']]:<7} {r['config'][:44]:<44} {r['regs']:>4} "
            f"{r['spill_stores']:>6} {r['smem'] / 1024:>7.1f} {mma:<10} {loads[:22]:<22} {verdict}"
        )
    return "\n".join(lines)


def summary_markdown(result: Mapping[str, Any]) -> str:
    """One row per kernel case, one column per arch: kept / total configs, and over the kept
    configs the most registers, spilled bytes, shared memory (KB) and the MMA kind."""
    archs = list(result["archs"])
    cases = list(dict.fromkeys(r["case"] for r in result["rows"]))
    head = "| kernel case | " + " | ".join(f"sm_{a}{'a' if a == 90 else ''}" for a in archs) + " |"
    lines = [head, "|---|" + "---|" * len(archs)]
    for case in cases:
        cells = []
        for arch in archs:
            rows = [r for r in result["rows"] if r["case"] == case and r["arch"] == arch]
            kept = [r for r in rows if not r["excluded"]]
            if not kept:
                cells.append(f"0/{len(rows)}")
                continue
            regs = max(r["regs"] for r in kept)
            spills = max(r["spill_stores"] + r["spill_loads"] for r in kept)
            smem = max(r["smem"] for r in kept) / 1024
            mma = "/".join(sorted({kind for r in kept for kind in r["mma"]})) or "-"
            cells.append(f"{len(kept)}/{len(rows)}, {regs} regs, {spills} B spill, {smem:.0f} KB, {mma}")
        lines.append(f"| `{case}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _suggested_excludes(result: Mapping[str, Any]) -> dict[str, dict[int, list[str]]]:
    out: dict[str, dict[int, list[str]]] = {}
    for s in result["summary"]:
        if s["kept_failing"]:
            out.setdefault(s["case"], {})[s["arch"]] = s["kept_failing"]
    return out


def _without_interpreter(argv: Sequence[str]) -> int:
    """Re-run in a child without TRITON_INTERPRET: the interpreter replaces the kernels the gate compiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.call([sys.executable, "-m", "pefomed.bench.static", *argv], env=env)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="pefomed bench static", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated: 80 (A100), 86 (A40), 90 (H100)")
    parser.add_argument("--only", help="cases whose name contains this")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiler processes")
    parser.add_argument("--no-cache", action="store_true", help="recompile everything")
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--module", action="append", default=[], help="extra module with STATIC_CASES")
    parser.add_argument("--selfcheck", action="store_true", help="check the gate on kernels built to fail each check")
    parser.add_argument("--summary", action="store_true",
                        help="print one markdown row per kernel case instead of one row per config")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _without_interpreter(argv)
    from pefomed.errors import UserError

    try:
        archs = tuple(int(a) for a in args.arch.split(","))
    except ValueError:
        raise UserError(f"--arch {args.arch!r}: expected comma-separated numbers from {list(ARCHS)}") from None
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        raise UserError(f"--arch {bad}: the gate knows {list(ARCHS)} (sm_80 A100, sm_86 A40, sm_90a H100)")
    if args.selfcheck:
        problems = run_selfcheck(not args.no_cache)
        for p in problems:
            print(f"selfcheck: {p}")
        print("selfcheck passed" if not problems else f"selfcheck: {len(problems)} problem(s)")
        return 1 if problems else 0
    result = run_gate(archs, args.only, max(1, args.jobs), not args.no_cache, args.module)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print(summary_markdown(result) if args.summary else _format_table(result))
    fails = failures(result)
    cached = sum(r.get("cached", False) for r in result["rows"])
    print(f"\n{len(result['rows'])} compiles ({cached} from cache) in {result['seconds']} s")
    if fails:
        print(f"\n{len(fails)} failure(s):")
        for f in fails:
            print(f"  {f}")
        suggest = _suggested_excludes(result)
        if suggest:
            print("\nto drop the failing configs on those archs (kernels.common.prune_for_device(EXCLUDE)):")
            for case, per_arch in suggest.items():
                print(f"  {case}: EXCLUDE = {{{', '.join(f'{a}: {set(v)!r}' for a, v in per_arch.items())}}}")
        return 1
    print("gate passed")
    return 0


if __name__ == "__main__":
    from pefomed.errors import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
