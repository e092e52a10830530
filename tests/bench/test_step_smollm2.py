"""bench.step on the real SmolLM2-135M-Instruct: the step it times computes what HF+PEFT computes.

One step of the PeFoMed-like micro-batch the CPU targets are measured on (B=4, T~300, LoRA r=64
on q_proj and v_proj, fp32), dropout off, ours against transformers + PEFT.
"""

import pytest
import torch

from pefomed.bench import step as S
from pefomed.models.llama import LlamaConfig


@pytest.mark.slow
def test_real_model_step_matches_hf_peft_in_fp32(smollm2):
    case = S.CASES["pefomed-vqa"]
    ours, hf = S.build_pair(smollm2, case, torch.float32, torch.device("cpu"), False, 0)
    config = LlamaConfig.from_hf(smollm2)
    batch = S.make_batch(case, 4, config.vocab_size, 0)
    feats = S.image_embeddings(batch, config.hidden_size, float(ours.embed.weight.std()), 0, torch.device("cpu"),
                               torch.float32)  # fmt: skip
    parity = S.check_parity(ours, hf, batch, feats, 0)
    assert parity["adapters_compared"] == 30 * 2 * 2
    assert parity["passed"], parity
    assert 290 <= batch["input_ids"].shape[1] <= 315
