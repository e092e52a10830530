"""Started by torchrun from test_memory.py: one fsdp2 step of a tiny config, and what each rank holds.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/bench/fsdp_memory_worker.py \
        OUT_DIR BATCH SEQ_LEN ANSWER_TOKENS CONFIG [key=value ...]

Each rank builds the model as `pefomed train` does (`engine.session.build_parallel_model`), takes
one micro-batch of exactly SEQ_LEN tokens, and writes `rank<r>.json`: the bytes of its parameter
shards, of its AdamW state after the step, and of the tensors its forward saved for backward
(`bench.step.SavedTensorMeter`, FSDP2's gathered weights excluded as parameters).
"""

import json
import sys
from pathlib import Path

import torch

from pefomed.bench import step as S
from pefomed.bench.memory import fixed_batch
from pefomed.engine import distributed, session
from pefomed.engine.build import n_image_tokens, vision_config
from pefomed.engine.config import load_config
from pefomed.engine.trainer import build_optimizer


def main() -> None:
    out, batch_size, seq_len, answer, config, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides)
    env = distributed.init_distributed("cpu", cfg.train.strategy)
    with distributed.leaving_together():
        record = measure(cfg, env, int(batch_size), int(seq_len), int(answer))  # the model dies with it
        Path(out, f"rank{env.rank}.json").write_text(json.dumps(record))


def measure(cfg, env, batch_size: int, seq_len: int, answer: int) -> dict:
    torch.manual_seed(cfg.train.seed)
    model, _ = session.build_parallel_model(cfg, env)
    model.train()
    params = S.tensor_bytes(list(model.parameters()))
    optimizer = build_optimizer(model, cfg.optim)
    vocab = model.llm.config.vocab_size
    batch = fixed_batch(batch_size, seq_len, n_image_tokens(cfg), answer, vocab, seed=env.rank)
    size = vision_config(cfg).image_size
    batch["pixel_values"] = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(env.rank))
    meter = S.SavedTensorMeter(model)
    with meter.measure():
        loss, _ = model(batch)
    saved, by_kind = meter.total, meter.by_kind()
    loss.backward()
    optimizer.step()
    meter.close()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "rank": env.rank,
        "world_size": env.world_size,
        "param_bytes": params,
        "optimizer_bytes": S.tensor_bytes(state),
        "saved_bytes": saved,
        "saved_by_kind": by_kind,
        "loss": float(loss),
    }


if __name__ == "__main__":
    main()
