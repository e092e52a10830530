"""`pefomed <command> ...`: one entry point for training, evaluation and benchmarks.

    pefomed train --config configs/pefomed_stage1.yaml [key=value ...]   (also under torchrun)
    pefomed demo  [--config configs/demo.yaml]
    pefomed eval  --checkpoint runs/x --out runs/x/eval
    pefomed score --predictions preds.jsonl --out scores/
    pefomed ask   --checkpoint runs/x --image scan.png --question "is there an effusion?"
    pefomed bench kernels [--smoke]
    pefomed bench static [--arch 80,86,90] [--only nf4]
    pefomed bench step [--ac both] [--layers N]
    pefomed bench memory --config X [--strategy S --gpus N --gpu-mem 40GB]
    pefomed fetch smollm2 [--out data/smollm2-135m-instruct]
    pefomed export  --checkpoint runs/x/checkpoints/step_N --out DIR [--merge]
    pefomed convert --checkpoint pefomed.pth --config configs/pefomed_stage2_vqa.yaml --out DIR

Each command is also a module: `python -m pefomed.evaluate.score` is `pefomed score`.
`--debug` after any command shows the traceback of a user error instead of one line.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from pefomed.errors import EXIT_USER_ERROR, run_cli

# command -> (module with `main(argv)`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("pefomed.train.run", "train from a YAML config (torchrun-aware)"),
    "demo": ("pefomed.train.demo", "synthetic data -> train a tiny model -> evaluate it"),
    "eval": ("pefomed.evaluate.run", "generate answers with a checkpoint and score them"),
    "score": ("pefomed.evaluate.score", "score a predictions file as the papers do"),
    "ask": ("pefomed.evaluate.ask", "ask one question about one image"),
    "fetch": ("pefomed.engine.fetch", "download and convert a small pretrained model (smollm2) for offline use"),
    "export": ("pefomed.engine.export", "a checkpoint as a Hugging Face folder (LoRA merged, or a PEFT adapter)"),
    "convert": ("pefomed.engine.published", "a released MiniGPT-v2 / PeFoMed .pth as a pefomed checkpoint folder"),
}
# `pefomed bench <suite>`
BENCHES: dict[str, tuple[str, str]] = {
    "kernels": ("pefomed.bench.kernels", "Triton kernels against their baselines"),
    "static": ("pefomed.bench.static", "kernels compiled for sm_80/86/90a on the CPU: spills, smem, MMA, loads"),
    "step": ("pefomed.bench.step", "one training step, ours against HF+PEFT"),
    "memory": ("pefomed.bench.memory", "where a run's memory goes, per GPU and strategy; does it fit"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS)) + 2
    lines = ["usage: pefomed <command> [args...]   (pefomed <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}{text}" for name, (_, text) in COMMANDS.items()]
    lines.append(f"  {'bench':<{width}}benchmarks: " + ", ".join(BENCHES))
    return "\n".join(lines)


def _resolve(argv: list[str]) -> tuple[str, list[str]] | None:
    if not argv:
        return None
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        return COMMANDS[command][0], rest
    if command == "bench":
        if not rest or rest[0] not in BENCHES:
            suites = ", ".join(BENCHES)
            raise SystemExit(f"usage: pefomed bench <suite> [args...]; suites: {suites}")
        return BENCHES[rest[0]][0], rest[1:]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else EXIT_USER_ERROR
    if args[0] == "--version":
        from pefomed import __version__

        print(__version__)
        return 0
    resolved = _resolve(args)
    if resolved is None:
        print(f"error: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    module, rest = resolved
    return run_cli(importlib.import_module(module).main, rest)


if __name__ == "__main__":
    sys.exit(main())
