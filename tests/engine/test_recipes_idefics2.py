"""Seed 3 (Med-Idefics): Idefics2-8B with QLoRA, configs/med_idefics_stage1_roco.yaml and
configs/med_idefics_stage2_vqarad.yaml.

- The configs hold the report's setup and build at full size on the meta device with the
  trainable-parameter count it gives, computed here from the shapes and checked against PEFT on
  transformers' Idefics2ForConditionalGeneration (meta) with the report's target regex.
- Both stages run a few steps at tiny size (NF4 text model, LoRA on the text model and the
  connector) through `engine.session.train_from_config`; the adapter that stage 1 saves loads
  in PEFT on transformers' Idefics2 and gives our model's logits; stage 2 starts from it.
"""

import dataclasses
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from pefomed.engine import session
from pefomed.engine.build import build_model, n_image_tokens
from pefomed.engine.config import load_config
from pefomed.engine.data import sources, synthetic
from pefomed.engine.data.collate import collate
from pefomed.engine.data.tokenizer import build_demo_tokenizer, load_tokenizer
from pefomed.engine.lora import FrozenNF4Linear, LoRALinear
from pefomed.kernels.nf4 import NF4Tensor
from pefomed.models import idefics2

ROOT = Path(__file__).resolve().parents[2]
STAGE1 = ROOT / "configs/med_idefics_stage1_roco.yaml"
STAGE2 = ROOT / "configs/med_idefics_stage2_vqarad.yaml"
FULL_SIZE = ["model.random_init=true", "model.llm=idefics2-8b", "model.adapter_checkpoint=null"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The report's modules, as PEFT's regex of the Idefics2 fine-tuning recipe it followed.
REPORT_REGEX = r".*(text_model|modality_projection|perceiver_resampler).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$"


def lora_count(r: int, layers: int, shapes: list[tuple[int, int]]) -> int:
    return layers * sum(r * (i + o) for i, o in shapes)


# Mistral-7B: width 4096, 8 KV heads of 128, MLP 14336, 32 layers.
TEXT = lora_count(8, 32, [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096),
                          (4096, 14336), (4096, 14336), (14336, 4096)])
# The modality projection: SwiGLU from SigLIP's 1152 through 14336 to 4096.
MODALITY = lora_count(8, 1, [(1152, 14336), (1152, 14336), (14336, 4096)])
# The perceiver: 3 layers, 16 query heads and 4 KV heads of 96, MLP 4 x 4096.
PERCEIVER = lora_count(8, 3, [(4096, 1536), (4096, 384), (4096, 384), (1536, 4096),
                              (4096, 16384), (4096, 16384), (16384, 4096)])


def test_the_configs_hold_the_reports_setup():
    for path in (STAGE1, STAGE2):
        cfg = load_config(path)
        m, lora, o, t = cfg.model, cfg.lora, cfg.optim, cfg.train
        assert (m.arch, m.quantize_llm, m.kernels, m.dtype, m.image_splitting, m.image_size) == (
            "idefics2", "nf4", "triton", "bfloat16", False, 980)
        assert (lora.r, lora.alpha, lora.dropout, lora.init, sorted(lora.target_modules)) == (
            8, 8, 0.1, "gaussian", sorted(TARGETS))
        assert (t.micro_batch_size, t.grad_accum, o.warmup_steps, o.weight_decay) == (2, 8, 50, 0.01)
    s1, s2 = load_config(STAGE1), load_config(STAGE2)
    assert (s1.optim.lr, [d.kind for d in s1.data.train]) == (1e-5, ["roco"])
    assert (s2.optim.lr, [d.kind for d in s2.data.train]) == (1e-4, ["vqa_rad"])
    assert s2.model.adapter_checkpoint.startswith(s1.train.output_dir)
    # 3 epochs of 55k ROCO pairs, 2 epochs of VQA-RAD's 3,064, at 16 per optimizer step.
    assert s1.train.max_steps == 3 * math.ceil(55_000 / 16) and s2.train.max_steps == 2 * math.ceil(3064 / 16)
    assert n_image_tokens(load_config(STAGE1, FULL_SIZE)) == 64  # one whole image, 64 latents


def test_full_size_builds_on_meta_with_the_reports_trainable_count():
    model = build_model(load_config(STAGE1, FULL_SIZE), "meta")
    counts = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in counts)
    part = {key: sum(v for n, v in counts.items() if key in n)
            for key in ("text_model", "modality_projection", "perceiver_resampler", "vision_model")}
    assert part == {"text_model": TEXT, "modality_projection": MODALITY, "perceiver_resampler": PERCEIVER,
                    "vision_model": 0}
    assert sum(counts.values()) == TEXT + MODALITY + PERCEIVER == 23_326_720

    # PEFT on transformers' Idefics2-8B (on meta) with the report's regex: the same layers, the same count.
    hf_cfg = transformers.Idefics2Config(
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           patch_size=14, image_size=980),
        perceiver_config=dict(hidden_size=4096, rms_norm_eps=1e-5),
        text_config=dict(model_type="mistral", vocab_size=32003, max_position_embeddings=32768, rms_norm_eps=1e-5,
                         pad_token_id=0),
    )
    with torch.device("meta"):
        hf = transformers.Idefics2ForConditionalGeneration(hf_cfg)
    assert sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n) == sum(
        p.numel() for p in hf.parameters())
    peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.1, init_lora_weights="gaussian",
                                               target_modules=REPORT_REGEX))
    theirs = {n.removeprefix("base_model.model.").replace(".default", "")
              for n, p in peft_model.named_parameters() if p.requires_grad}
    assert theirs == {n.removeprefix("llm.") for n in counts}
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 23_326_720


def test_the_qlora_layers_are_built_as_the_recipe_says():
    """NF4 for the text model's frozen weights, full precision under the connector's adapters,
    no adapter on SigLIP; the recipe's LoRA (dropout 0.1 included) runs through the Triton kernel."""
    from pefomed.kernels.lora import lora_linear

    cfg = load_config(STAGE1, ["model.random_init=true", "model.llm=tiny-idefics2", "model.image_size=64"])
    model = build_model(cfg, "cpu")
    llm = model.llm
    q = llm.model.text_model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and isinstance(q.weight, NF4Tensor) and q._fn is lora_linear
    assert (q.r, q.scaling, q.dropout) == (8, 1.0, 0.1)
    gate = llm.model.connector.modality_projection.gate_proj
    assert isinstance(gate, LoRALinear) and not isinstance(gate.weight, NF4Tensor) and gate._fn is lora_linear
    assert isinstance(llm.model.connector.perceiver_resampler.layers[1].self_attn.o_proj, LoRALinear)
    assert type(llm.model.vision_model.encoder.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not any(isinstance(m, (LoRALinear, FrozenNF4Linear)) for m in llm.model.vision_model.modules())
    assert not any(isinstance(m, (LoRALinear, FrozenNF4Linear)) for m in llm.lm_head.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)


# ---------------------------------------------------------------- tiny runs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The synthetic set at 64 px and a demo tokenizer with Idefics2's three tokens."""
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root, n_train=24, n_test=4, image_size=64, seed=0)
    build_demo_tokenizer(synthetic.corpus(root) + ["User: Assistant:"], root / "tokenizer")
    tok = load_tokenizer(root / "tokenizer")
    tok.add_special_tokens({"additional_special_tokens": [idefics2.FAKE_IMAGE_TOKEN, idefics2.IMAGE_TOKEN,
                                                          idefics2.END_OF_UTTERANCE]})
    tok.save_pretrained(str(root / "tokenizer"))
    return root


def tiny(path: Path, out: Path, data: Path, *extra: str):
    return load_config(path, [
        f"train.output_dir={out}", "model.random_init=true", "model.llm=tiny-idefics2", "model.image_size=64",
        f"model.tokenizer={data}/tokenizer", "model.dtype=float32", "model.kernels=torch", "train.strategy=single",
        "train.device=cpu", "train.micro_batch_size=2", "train.grad_accum=2", "train.max_steps=3",
        "train.save_every=0", "train.progress_bar=false", "optim.warmup_steps=1", "data.max_length=160",
        "data.eval=[]", *extra,
    ])


@pytest.fixture
def dataset_with_model_inputs():
    """engine.data.sources.build_dataset, which hands Idefics2 its own image processing."""
    return sources.build_dataset


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def hf_twin(ours: idefics2.Idefics2ForConditionalGeneration, image_token_id: int):
    """transformers' Idefics2 with our model's base weights (NF4 weights dequantized)."""
    c = ours.config
    hf_cfg = transformers.Idefics2Config(
        vision_config=dict(hidden_size=c.vision.hidden_size, intermediate_size=c.vision.intermediate_size,
                           num_hidden_layers=c.vision.num_layers, num_attention_heads=c.vision.num_heads,
                           patch_size=c.vision.patch_size, image_size=c.vision.image_size),
        perceiver_config=dict(hidden_size=c.perceiver.hidden_size, resampler_n_latents=c.perceiver.n_latents,
                              resampler_depth=c.perceiver.depth, resampler_n_heads=c.perceiver.n_heads,
                              resampler_head_dim=c.perceiver.head_dim,
                              num_key_value_heads=c.perceiver.num_key_value_heads, rms_norm_eps=c.perceiver.rms_norm_eps),
        text_config=dict(model_type="mistral", vocab_size=c.text.vocab_size, hidden_size=c.text.hidden_size,
                         intermediate_size=c.text.intermediate_size, num_hidden_layers=c.text.num_hidden_layers,
                         num_attention_heads=c.text.num_attention_heads, num_key_value_heads=c.text.num_key_value_heads,
                         rms_norm_eps=c.text.rms_norm_eps, sliding_window=c.text.sliding_window, pad_token_id=0,
                         max_position_embeddings=c.text.max_position_embeddings),
        image_token_id=image_token_id,
    )
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.Idefics2ForConditionalGeneration(hf_cfg).eval()
    base = {n: (t.dequantize(torch.float32) if isinstance(t, NF4Tensor) else t)
            for n, t in ours.state_dict().items() if ".lora_" not in n}
    hf.load_state_dict(base, strict=True)
    return hf


@pytest.mark.slow
def test_both_stages_run_at_tiny_size_and_the_adapter_loads_in_peft(tmp_path, data, dataset_with_model_inputs):
    caption = f"data.train=[{{kind: caption, path: {data}, split: train, image_root: {data}/images}}]"
    out1 = tmp_path / "stage1"
    session.train_from_config(tiny(STAGE1, out1, data, caption))
    assert len(losses(out1)) == 3 and all(math.isfinite(x) for x in losses(out1))
    final = out1 / "checkpoints/step_3"
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert load_file(str(final / "projection.safetensors")) == {}  # the connector trains through LoRA only
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in adapter}
    assert "model.text_model.layers.0.self_attn.q_proj" in modules
    assert "model.connector.modality_projection.down_proj" in modules
    assert "model.connector.perceiver_resampler.layers.1.mlp.gate_proj" in modules
    assert not any("vision_model" in m for m in modules)
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if ".lora_B." in k)  # it trained

    # PEFT loads the saved folder onto transformers' Idefics2 and gives our model's logits.
    cfg = tiny(STAGE1, tmp_path / "unused", data, caption, f"model.adapter_checkpoint={final}")
    tok = load_tokenizer(data / "tokenizer")
    cfg.model.llm_overrides["vocab_size"] = len(tok)
    ours = build_model(cfg).eval()
    samples = sources.load_samples(cfg.data.train, cfg)
    dataset = dataset_with_model_inputs(samples[:3], cfg, tok, train=True)
    batch = collate([dataset[i] for i in range(3)], pad_token_id=tok.pad_token_id)
    assert batch["pixel_values"].shape[:2] == (3, 1) and "pixel_attention_mask" in batch
    image_id = tok.convert_tokens_to_ids(idefics2.IMAGE_TOKEN)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"], pixel_attention_mask=batch["pixel_attention_mask"])
    real = batch["attention_mask"].bool()

    def err(a, b):
        return float((a[real] - b[real]).double().norm() / b[real].double().norm())

    with torch.no_grad():
        got = ours.llm(**inputs, image_token_mask=batch["image_token_mask"])
    # The saved tensors are PEFT's, for exactly the report's layers: no key missing, none left over.
    saved = json.loads((final / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"], saved["init_lora_weights"]) == (8, 8, 0.1, "gaussian")
    precise = get_peft_model(hf_twin(ours.llm, image_id), LoraConfig(
        r=8, lora_alpha=8, lora_dropout=0.1, init_lora_weights="gaussian", target_modules=REPORT_REGEX)).eval()
    result = set_peft_model_state_dict(precise, adapter)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if ".lora_" in k]
    with torch.no_grad():
        assert err(got, precise(**inputs).logits) < 1e-5
        with precise.disable_adapter():
            assert err(precise(**inputs).logits, got) > 1e-4  # the adapter acts
    # The folder as saved loads in PEFT as it is, adapters on exactly the same layers (none on
    # SigLIP, whose q/k/v_proj share the text model's names), and gives the same logits.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns of adapter keys it expected but missed
        loaded = PeftModel.from_pretrained(hf_twin(ours.llm, image_id), str(final)).eval()
    wrapped = {n.removeprefix("base_model.model.").replace(".default", "")
               for n, _ in loaded.named_parameters() if ".lora_" in n}
    assert wrapped == {k.removeprefix("base_model.model.") for k in adapter}
    with torch.no_grad():
        assert err(got, loaded(**inputs).logits) < 1e-5

    # Stage 2 starts from stage 1's adapter, on VQA.
    out2 = tmp_path / "stage2"
    vqa = f"data.train=[{{kind: synthetic, path: {data}, split: train}}]"
    session.train_from_config(tiny(STAGE2, out2, data, vqa, f"model.adapter_checkpoint={final}", "train.max_steps=2"))
    assert len(losses(out2)) == 2 and all(math.isfinite(x) for x in losses(out2))
    start = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, adapter_checkpoint=str(final))))
    params = dict(start.llm.named_parameters())
    for key, tensor in adapter.items():
        assert torch.equal(params[key.removeprefix("base_model.model.")], tensor)


@pytest.mark.slow
def test_the_recipes_triton_kernels_give_the_torch_step():
    """One QLoRA step of the recipe as configured (model.kernels: triton, NF4 text model; the
    Triton interpreter on the CPU) against the same step through plain PyTorch: the same loss and
    adapter gradients. (LoRA dropout is 0 here, so that both draw no mask; the fused dropout is
    tested with the kernels.)"""
    def build(kernels: str):
        cfg = load_config(STAGE1, ["model.random_init=true", "model.llm=tiny-idefics2", "model.image_size=64",
                                   "model.dtype=float32", "lora.dropout=0.0", f"model.kernels={kernels}"])
        return build_model(cfg, "cpu")

    fused, plain = build("triton"), build("torch")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-zero B, the same in both, so that the adapters act
        for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters()):
            if ".lora_B." in name:
                a.copy_(torch.randn(a.shape, generator=g) * 0.1)
                b.copy_(a)
    inputs = idefics2.Idefics2Inputs(idefics2.Idefics2ImageProcessor(False, 24, 64), image_seq_len=4)

    class Ids:
        unk_token_id = 0

        def convert_tokens_to_ids(self, token):
            return {idefics2.FAKE_IMAGE_TOKEN: 297, idefics2.IMAGE_TOKEN: 298, idefics2.END_OF_UTTERANCE: 299}[token]

    span, span_mask = inputs.image_span(Ids())
    ids = torch.tensor([[1, 5, 6] + span + [7, 8, 9, 10, 11]] * 2)
    labels = ids.clone()
    labels[:, :10] = -100
    batch = {"input_ids": ids, "labels": labels, "image_token_mask": torch.tensor([[False] * 3 + span_mask + [False] * 5] * 2),
             **idefics2.pad_images([[torch.randn(3, 40, 64, generator=g)], [torch.randn(3, 64, 48, generator=g)]])}
    losses = []
    for model in (fused, plain):
        loss, _ = model(batch)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[1])
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in fused.named_parameters():
        if p.requires_grad:
            want = grads[name].double()
            assert float((p.grad.double() - want).norm() / want.norm()) < 1e-5, name


def test_idefics2_options_are_checked_naming_the_fix():
    from pefomed.engine.config import ConfigError

    with pytest.raises(ConfigError, match="model.vision_checkpoint does not apply to model.arch=idefics2"):
        load_config(STAGE1, ["model.vision_checkpoint=/models/eva_vit_g.pth"])
    with pytest.raises(ConfigError, match=r"model.llm='llama3-8b' with model.random_init=true must name .*idefics2-8b"):
        load_config(STAGE1, ["model.random_init=true", "model.llm=llama3-8b"])
    with pytest.raises(ConfigError, match="covers images up to 980 px"):
        build_model(load_config(STAGE1, [*FULL_SIZE, "model.image_size=1024"]), "meta")
    with pytest.raises(ConfigError, match=r"\['out_proj'\] match no linear layer of Idefics2's text model or connector"):
        build_model(load_config(STAGE1, [*FULL_SIZE, "lora.target_modules=[q_proj, out_proj]"]), "meta")
    # do_image_splitting: the 4 quadrants and the whole image, 64 latents each.
    assert n_image_tokens(load_config(STAGE1, [*FULL_SIZE, "model.image_splitting=true"])) == 5 * 64


@pytest.mark.slow
def test_eval_and_ask_run_idefics2_through_one_path(tmp_path, data):
    """`pefomed eval` and `pefomed ask` decode an Idefics2 checkpoint (crops, pixel mask,
    <end_of_utterance> stop) and give the same answer for the same image and question."""
    from pefomed.evaluate import ask, run

    vqa = f"data.train=[{{kind: synthetic, path: {data}, split: train}}]"
    out = tmp_path / "run"
    session.train_from_config(tiny(STAGE2, out, data, vqa, "model.adapter_checkpoint=null", "eval.max_new_tokens=6"))
    checkpoint = run.resolve_checkpoint(out)
    cfg = run.load_eval_config(checkpoint, None, [])
    records = run.predict(*run.load_model_for_eval(cfg, checkpoint), sources.load_samples(
        [dataclasses.replace(s, split="test") for s in cfg.data.train], cfg), cfg)
    assert len(records) == 4 and not any("error" in r for r in records)
    first = records[0]
    answer = ask.ask(checkpoint, first["image"], first["question"], max_new_tokens=6)
    assert answer == first["prediction"]
