"""models.idefics2 (and models.perceiver) against transformers' Idefics2 on tiny random configs:
the perceiver resampler alone, the connector, the whole model with images (fp32 logits within
1e-5), a saved transformers folder, greedy generation, and the processor (image splitting,
resizing, normalization, padding, and the prompt's image expansion)."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil
from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector as HFConnector
from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

from pefomed.engine.data.collate import encode_prompt
from pefomed.engine.data.prompts import build_prompt
from pefomed.engine.data.tokenizer import build_demo_tokenizer, load_tokenizer
from pefomed.models.idefics2 import (
    END_OF_UTTERANCE,
    FAKE_IMAGE_TOKEN,
    IMAGE_TOKEN,
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics2ImageProcessor,
    Idefics2Inputs,
    Idefics2VisionLanguageModel,
    pad_images,
)
from pefomed.models.perceiver import PerceiverConfig, PerceiverResampler

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
              image_size=64, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
PERCEIVER = dict(hidden_size=64, resampler_n_latents=4, resampler_depth=2, resampler_n_heads=4, resampler_head_dim=16,
                 num_key_value_heads=2, rms_norm_eps=1e-5, hidden_act="silu")
TEXT = dict(model_type="mistral", vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
            sliding_window=None, pad_token_id=0)
FAKE, IMAGE, EOU = 297, 298, 299
PROCESSOR = Idefics2ImageProcessor(do_image_splitting=True, shortest_edge=24, longest_edge=64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial norms and latents (transformers initializes them to ones and zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def hf_config() -> transformers.Idefics2Config:
    cfg = transformers.Idefics2Config(vision_config=VISION, perceiver_config=PERCEIVER, text_config=TEXT,
                                      image_token_id=IMAGE)
    cfg._attn_implementation = "sdpa"
    return cfg


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    hf = transformers.Idefics2ForConditionalGeneration(hf_config()).eval()
    perturb(hf, 1)
    ours = Idefics2ForConditionalGeneration(Idefics2Config.from_hf(hf.config)).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not missing and not unexpected
    return hf, ours


class _Ids:
    """The three Idefics2 tokens at fixed ids, for prompts built by hand."""

    unk_token_id = 0

    def convert_tokens_to_ids(self, token: str) -> int:
        return {FAKE_IMAGE_TOKEN: FAKE, IMAGE_TOKEN: IMAGE, END_OF_UTTERANCE: EOU}[token]


def images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 64), (90, 50))]


def batch_inputs(processor: Idefics2ImageProcessor = PROCESSOR, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two samples with text around their image spans, the second right-padded by 2."""
    inputs = Idefics2Inputs(processor, image_seq_len=4)
    span, span_mask = inputs.image_span(_Ids())
    rows = [[1, 5, 6] + span + [7, 8, 9, 10, 11], [1, 12, 16] + span + [13, 14, 15, 0, 0]]
    batch = pad_images([processor(im) for im in images(seed)])
    batch["input_ids"] = torch.tensor(rows)
    batch["attention_mask"] = torch.tensor([[1] * len(rows[0]), [1] * (len(rows[1]) - 2) + [0, 0]])
    batch["image_token_mask"] = torch.tensor([[False] * 3 + span_mask + [False] * 5] * 2)
    return batch


def test_perceiver_resampler_alone_matches_transformers():
    hf_cfg = transformers.Idefics2PerceiverConfig(**PERCEIVER)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = Idefics2PerceiverResampler(hf_cfg).eval()
    perturb(hf, 2)
    ours = PerceiverResampler(PerceiverConfig.from_hf(hf_cfg, 64, 1e-5)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    g = torch.Generator().manual_seed(3)
    context = torch.randn(3, 20, 64, generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    with torch.no_grad():
        want = hf(context, mask)
        got = ours(context, mask)
        assert got.shape == (3, 4, 64)
        assert rel_err(got, want) < 1e-5
        # Masked context tokens must not matter: change them and nothing moves.
        poked = context.clone()
        poked[1, 12:] += 5.0
        assert rel_err(ours(poked, mask), got) < 1e-6
        assert rel_err(ours(poked, torch.ones_like(mask)), got) > 1e-3


def test_connector_matches_transformers(models):
    hf, ours = models
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 30, 32, generator=g)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, 20:] = False
    with torch.no_grad():
        want = hf.model.connector(hidden, attention_mask=mask)
        got = ours.model.connector(hidden, mask)
    assert isinstance(hf.model.connector, HFConnector)
    assert rel_err(got, want) < 1e-5


def test_whole_model_logits_match_transformers(models):
    hf, ours = models
    b = batch_inputs()
    assert b["pixel_values"].shape == (2, 5, 3, 64, 64)  # 4 crops + the image, padded to the largest
    with torch.no_grad():
        want = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                  pixel_attention_mask=b["pixel_attention_mask"]).logits
        got = ours(b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                   pixel_attention_mask=b["pixel_attention_mask"], image_token_mask=b["image_token_mask"])
    real = b["attention_mask"].bool()
    assert rel_err(got[real], want[real]) < 1e-5
    # The images matter: other pixels give other logits after the image span.
    other = batch_inputs(seed=1)
    with torch.no_grad():
        moved = ours(b["input_ids"], attention_mask=b["attention_mask"], pixel_values=other["pixel_values"],
                     pixel_attention_mask=other["pixel_attention_mask"], image_token_mask=b["image_token_mask"])
    assert rel_err(moved[:, -6:], got[:, -6:]) > 1e-3


def test_engine_model_loss_is_the_target_token_cross_entropy(models):
    hf, ours = models
    b = batch_inputs()
    labels = torch.full_like(b["input_ids"], -100)
    labels[0, -3:] = b["input_ids"][0, -3:]
    labels[1, -4:-2] = b["input_ids"][1, -4:-2]
    with torch.no_grad():
        loss, n = Idefics2VisionLanguageModel(ours)({**b, "labels": labels})
    with torch.no_grad():
        logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                    pixel_attention_mask=b["pixel_attention_mask"]).logits.double()
    shift = labels[:, 1:]
    want = torch.nn.functional.cross_entropy(logits[:, :-1][shift != -100], shift[shift != -100])
    assert int(n) == 5
    assert abs(loss.item() - want.item()) < 1e-5 * want.item()


def test_engine_model_refuses_a_batch_without_the_idefics2_pixel_mask(models):
    _, ours = models
    b = batch_inputs()
    del b["pixel_attention_mask"]
    with pytest.raises(ValueError, match="pixel_attention_mask"):
        Idefics2VisionLanguageModel(ours)({**b, "labels": b["input_ids"]})


def test_greedy_generation_matches_transformers(models):
    hf, ours = models
    b = batch_inputs()
    ids = b["input_ids"][:1, :-2]  # one prompt, no padding: decoding continues after it
    mask = torch.ones_like(ids)
    image_mask = b["image_token_mask"][:1, :-2]
    pixel_values, pixel_mask = b["pixel_values"][:1], b["pixel_attention_mask"][:1]
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                           pixel_attention_mask=pixel_mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[:, ids.shape[1]:]
    got = Idefics2VisionLanguageModel(ours).generate(
        pixel_values, ids, mask, image_mask, max_new_tokens=6, eos_token_id=[], pad_token_id=0,
        pixel_attention_mask=pixel_mask,
    )
    assert got.tolist() == want.tolist()


def test_loads_a_transformers_folder(tmp_path, models):
    hf, ours = models
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = Idefics2ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.config == ours.config
    b = batch_inputs()
    with torch.no_grad():
        a = loaded(b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                   pixel_attention_mask=b["pixel_attention_mask"], image_token_mask=b["image_token_mask"])
        want = ours(b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                    pixel_attention_mask=b["pixel_attention_mask"], image_token_mask=b["image_token_mask"])
    assert torch.equal(a, want)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("sizes,edges", [
    (((40, 64), (90, 50), (13, 101)), (24, 64)),
    (((300, 500), (1200, 700)), (378, 980)),  # the released processor's sizes: 1200 px is brought to 980
])
def test_image_processor_matches_transformers(split, sizes, edges):
    rng = np.random.default_rng(5)
    pics = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    reference = Idefics2ImageProcessorPil(do_image_splitting=split, size={"shortest_edge": edges[0],
                                                                          "longest_edge": edges[1]})
    want = reference([[p] for p in pics], return_tensors="pt")
    ours = Idefics2ImageProcessor(do_image_splitting=split, shortest_edge=edges[0], longest_edge=edges[1])
    got = pad_images([ours(p) for p in pics])
    assert got["pixel_values"].shape == want["pixel_values"].shape
    assert torch.equal(got["pixel_attention_mask"], want["pixel_attention_mask"].long())
    assert float((got["pixel_values"] - want["pixel_values"]).abs().max()) < 1e-6


def test_prompt_expansion_matches_idefics2_processor(tmp_path):
    texts = ["user : what is in this image ? assistant : a lesion in the left lung"]
    build_demo_tokenizer(texts, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    tok.add_special_tokens({"additional_special_tokens": [FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE]})
    image_processor = Idefics2ImageProcessorPil(do_image_splitting=True, size={"shortest_edge": 24, "longest_edge": 64})
    processor = transformers.Idefics2Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4)
    question = "what is in this image?"
    text = f"User:{IMAGE_TOKEN}{question}{END_OF_UTTERANCE}\nAssistant:"
    want = processor(text=text, images=[images()[0]], return_tensors="pt")
    prompt = build_prompt("vqa", question, "short", chat="idefics2")
    inputs = Idefics2Inputs(PROCESSOR, image_seq_len=4)
    ids, mask = encode_prompt(tok, prompt, inputs.n_image_tokens, inputs.image_span(tok))
    assert ids == want["input_ids"][0].tolist()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert mask == [i == image_id for i in ids]
    assert sum(mask) == 5 * 4 and ids.count(tok.convert_tokens_to_ids(FAKE_IMAGE_TOKEN)) == 6


def test_a_tokenizer_without_the_idefics2_tokens_is_named(tmp_path):
    build_demo_tokenizer(["a b c"], tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    with pytest.raises(ValueError, match="the tokenizer has no <fake_token_around_image> token"):
        Idefics2Inputs(PROCESSOR, image_seq_len=4).image_span(tok)
