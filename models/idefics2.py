"""Idefics2 (Med-Idefics' base model): SigLIP vision, a perceiver connector, Mistral-7B.

`Idefics2ForConditionalGeneration` has transformers' parameter names, so the released folders
(`HuggingFaceM4/idefics2-8b`, fine-tunes of it) load with no rename:

    model.vision_model.*           SigLIP, models/siglip.py
    model.connector.modality_projection.{gate,up,down}_proj
                                   SwiGLU from the vision width (1152) through the LLM's MLP
                                   width (14336) to its hidden size (4096)
    model.connector.perceiver_resampler.*
                                   64 latents, 3 layers, models/perceiver.py
    model.text_model.*             Mistral-7B (models/llama.py's LlamaModel)
    lm_head.weight

The text model is models/llama.py's `LlamaForCausalLM`, composed, not copied: its `model` and
`lm_head` modules are registered here under transformers' names, and its forward and greedy
`generate` run them (`decoder`). A PEFT adapter saved from this model (the checkpoint's keys
`base_model.model.model.text_model.layers.N.self_attn.q_proj.lora_A.weight`, ...) is the one PEFT
writes for transformers' Idefics2ForConditionalGeneration.

An image becomes `n_latents` (64) LLM tokens; with image splitting (`do_image_splitting`), the
processor also cuts it into 4 quadrants, so 5 images and 320 tokens. The prompt carries
`<fake_token_around_image>` around each image's run of `<image>` tokens, whose embeddings the
connector's output replaces. `Idefics2ImageProcessor` and `Idefics2Inputs` below do what
transformers' `Idefics2ImageProcessor` and `Idefics2Processor` do (resize to a shortest edge of
378 and a longest edge of 980 keeping the aspect ratio, split, rescale, normalize with mean and
std 0.5, pad to the batch's largest image with a pixel mask; expand the image placeholder).

`Idefics2VisionLanguageModel` is what the engine trains: the batch contract of
docs/architecture.md plus `pixel_values [B, n_images, 3, H, W]` and `pixel_attention_mask
[B, n_images, H, W]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pefomed.models import llama
from pefomed.models.llama import TargetRows
from pefomed.models.loading import CheckpointError, iter_state_dict, load_into, meta_tensor_names
from pefomed.models.perceiver import PerceiverConfig, PerceiverResampler, SwiGLU
from pefomed.models.siglip import SiglipVisionConfig, SiglipVisionTransformer, patch_attention_mask
from pefomed.models.vlm import packing_from_batch

LinearFactory = llama.LinearFactory

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN / _STD


@dataclass(frozen=True)
class Idefics2Config:
    vision: SiglipVisionConfig
    perceiver: PerceiverConfig
    text: llama.LlamaConfig
    image_token_id: int = 32001

    def __post_init__(self) -> None:
        if self.perceiver.hidden_size != self.text.hidden_size:
            raise ValueError(
                f"Idefics2Config: the perceiver's hidden_size={self.perceiver.hidden_size} must be the text "
                f"model's hidden_size={self.text.hidden_size}"
            )
        if self.text.model_type != "mistral":
            raise ValueError(f"Idefics2Config: the text model is Mistral, got model_type={self.text.model_type!r}")

    @property
    def image_seq_len(self) -> int:
        return self.perceiver.n_latents

    # The language model's depth and width, where the engine reads a LLaMA config's (the
    # trainer's FLOP count): the text model does most of the work.
    @property
    def num_hidden_layers(self) -> int:
        return self.text.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @classmethod
    def from_hf(cls, source: str | Path | object) -> Idefics2Config:
        """From an Idefics2 model folder (its config.json) or a transformers `Idefics2Config`.

        transformers resolves the sub-configs' defaults (Mistral's sizes are omitted from the
        released config.json when they equal MistralConfig's), so it reads the file.
        """
        where = "<Idefics2Config>"
        if isinstance(source, (str, Path)):
            from transformers import AutoConfig

            where = str(Path(source) / "config.json")
            try:
                source = AutoConfig.from_pretrained(str(source), local_files_only=True)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{where}: cannot read an Idefics2 config ({e})") from e
        if getattr(source, "model_type", None) != "idefics2":
            raise CheckpointError(
                f"{where}: model_type={getattr(source, 'model_type', None)!r}; model.arch=idefics2 needs an "
                "Idefics2 folder (model_type 'idefics2'), e.g. HuggingFaceM4/idefics2-8b"
            )
        text = llama.LlamaConfig.from_hf(source.text_config.to_dict())
        try:
            return cls(
                vision=SiglipVisionConfig.from_hf(source.vision_config),
                perceiver=PerceiverConfig.from_hf(source.perceiver_config, text.hidden_size, text.rms_norm_eps),
                text=text,
                image_token_id=source.image_token_id,
            )
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from e

    def with_text(self, **changes) -> Idefics2Config:
        return dataclasses.replace(self, text=dataclasses.replace(self.text, **changes))


_MISTRAL_7B = dataclasses.asdict(llama.CONFIGS["mistral-7b"])
CONFIGS: dict[str, Idefics2Config] = {
    # HuggingFaceM4/idefics2-8b: SigLIP-so400m at up to 980 px, 64 latents, Mistral-7B-v0.1 with
    # the three added tokens (<fake_token_around_image> 32000, <image> 32001, <end_of_utterance> 32002).
    "idefics2-8b": Idefics2Config(
        vision=SiglipVisionConfig(),
        perceiver=PerceiverConfig(),
        text=llama.LlamaConfig(**{**_MISTRAL_7B, "vocab_size": 32003, "pad_token_id": 0}),
    ),
    # Small enough for CPU tests and the demo; the text vocabulary follows the tokenizer.
    "tiny-idefics2": Idefics2Config(
        vision=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, patch_size=8,
                                  image_size=64),
        perceiver=PerceiverConfig(hidden_size=64, n_latents=4, depth=2, n_heads=4, head_dim=16, num_key_value_heads=2,
                                  rms_norm_eps=1e-5),
        text=llama.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               rms_norm_eps=1e-5, model_type="mistral", sliding_window=None, pad_token_id=0),
        image_token_id=299,
    ),
}


def _prefixed(factory: LinearFactory, prefix: str, strip: str = "") -> LinearFactory:
    """The factory under transformers' full names (`model.text_model.layers.0.self_attn.q_proj`)."""

    def make(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return factory(prefix + name.removeprefix(strip), in_features, out_features, bias)

    return make


class Idefics2Connector(nn.Module):
    def __init__(self, config: Idefics2Config, linear: LinearFactory) -> None:
        super().__init__()
        v, t = config.vision, config.text
        # The activation of transformers' modality projection is the text model's (silu).
        self.modality_projection = SwiGLU(
            v.hidden_size, t.intermediate_size, t.hidden_size, "silu", "model.connector.modality_projection", linear
        )
        self.perceiver_resampler = PerceiverResampler(
            config.perceiver, linear, prefix="model.connector.perceiver_resampler"
        )

    def forward(self, image_hidden: torch.Tensor, patch_mask: torch.Tensor | None) -> torch.Tensor:
        return self.perceiver_resampler(self.modality_projection(image_hidden), patch_mask)


class Idefics2Model(nn.Module):
    def __init__(
        self,
        config: Idefics2Config,
        text_model: llama.LlamaModel,
        vision_factory: LinearFactory,
        connector_factory: LinearFactory,
    ) -> None:
        super().__init__()
        self.vision_model = SiglipVisionTransformer(config.vision, vision_factory, prefix="model.vision_model")
        self.connector = Idefics2Connector(config, connector_factory)
        self.text_model = text_model

    # The text model's parts where engine.distributed finds a LLaMA's (`llm.model.layers`, ...):
    # the units that FSDP2 shards and activation checkpointing wraps. Views, not registrations.
    @property
    def layers(self) -> nn.ModuleList:
        return self.text_model.layers

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.text_model.embed_tokens

    @property
    def norm(self) -> nn.Module:
        return self.text_model.norm


class Idefics2ForConditionalGeneration(nn.Module):
    def __init__(
        self,
        config: Idefics2Config,
        *,
        text_factory: LinearFactory | None = None,
        connector_factory: LinearFactory | None = None,
        vision_factory: LinearFactory | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        default = llama.default_linear
        decoder = llama.LlamaForCausalLM(config.text, _prefixed(text_factory or default, "model.text_model.", "model."))
        extra = set(decoder._parameters) | set(decoder._buffers) | (set(decoder._modules) - {"model", "lm_head"})
        if extra:
            # Only `model` and `lm_head` are registered here; anything else would be left behind by .to().
            raise TypeError(f"LlamaForCausalLM holds {sorted(extra)} outside model/lm_head; Idefics2 cannot compose it")
        self.model = Idefics2Model(
            config,
            decoder.model,
            _prefixed(vision_factory or default, ""),
            _prefixed(connector_factory or default, ""),
        )
        self.lm_head = decoder.lm_head
        # Not a registered submodule: its `model` and `lm_head` are the ones registered above.
        self.__dict__["decoder"] = decoder

    def train(self, mode: bool = True) -> Idefics2ForConditionalGeneration:
        super().train(mode)
        self.decoder.training = mode
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.text_model.embed_tokens

    def image_features(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`[B, n, 3, H, W]` (or `[N, 3, H, W]`) -> `[N_real, n_latents, hidden]`, real images in order.

        As transformers does, an image whose pixels are all 0.0 is padding (a sample with fewer
        images than the batch's most) and is skipped.
        """
        images = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        dtype = self.model.vision_model.post_layernorm.weight.dtype
        real = (images != 0).flatten(1).any(dim=1)
        images = images[real].to(dtype)
        if pixel_attention_mask is None:
            patches = None
        else:
            pixels = pixel_attention_mask.reshape(-1, *pixel_attention_mask.shape[-2:])[real]
            patches = patch_attention_mask(pixels.bool(), self.config.vision.patch_size)
        vision = self.model.vision_model
        # The tower is frozen in every recipe here: keep no activations for it unless it trains.
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in vision.parameters())):
            hidden = vision(images, patches)
        flat = None if patches is None else patches.reshape(patches.shape[0], -1)
        return self.model.connector(hidden, flat)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        pixel_attention_mask: torch.Tensor | None,
        image_token_mask: torch.Tensor | None,
        image_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the images' latents written at the `<image>` positions, in order.

        `image_rows` are those positions' flat indices into `[B*T]` (the collate's); without
        them they are found in `image_token_mask`, or else at the `<image>` token id.
        """
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        hidden = embeds.shape[-1]
        feats = self.image_features(pixel_values, pixel_attention_mask).reshape(-1, hidden)
        if image_rows is None:
            if image_token_mask is None:
                image_token_mask = input_ids == self.config.image_token_id
            image_rows = image_token_mask.reshape(-1).nonzero().squeeze(1)
        if image_rows.shape[0] != feats.shape[0]:
            raise ValueError(
                f"the batch has {image_rows.shape[0]} image positions but its images give {feats.shape[0]} tokens "
                f"({self.config.image_seq_len} latents each); the prompt's image expansion and "
                "model.image_splitting must agree"
            )
        flat = embeds.reshape(-1, hidden).index_copy(0, image_rows, feats.to(embeds.dtype))
        return flat.view_as(embeds)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        image_token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[B, T, vocab]`; without `image_token_mask` the `<image>` ids mark the positions."""
        embeds = self.embed(input_ids, pixel_values, pixel_attention_mask, image_token_mask)
        return self.decoder(inputs_embeds=embeds, attention_mask=attention_mask)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: Idefics2Config | None = None,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        text_factory: LinearFactory | None = None,
        connector_factory: LinearFactory | None = None,
        vision_factory: LinearFactory | None = None,
        allow_missing: Iterable[str] = (),
    ) -> Idefics2ForConditionalGeneration:
        """A transformers Idefics2 folder, built on the meta device and assigned tensor by tensor.

        The factories' modules take charge of how their weights are stored (QLoRA quantizes the
        text model's as they arrive). Names matching `allow_missing` (the adapters) may be absent.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: expected an Idefics2 model folder with config.json and weights")
        config = config or Idefics2Config.from_hf(path)
        with torch.device("meta"):
            model = cls(
                config, text_factory=text_factory, connector_factory=connector_factory, vision_factory=vision_factory
            )
        model.decoder.config_source = str(path / "config.json")
        load_into(
            model,
            iter_state_dict(path),
            dtype=dtype,
            device=device,
            allow_missing=allow_missing,
            ignore=[r"(^|\.)rotary_emb\.inv_freq$"],
            source=str(path),
        )
        leftover = meta_tensor_names(model, allow=allow_missing)
        if leftover:
            raise CheckpointError(f"{path}: no values for {leftover[:8]} after loading (no checkpoint key, no init)")
        return model

    def shape_mismatch_hint(self, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> str | None:
        if name.startswith("model.text_model.") or name.startswith("lm_head."):
            return self.decoder.shape_mismatch_hint("model." + name.removeprefix("model.text_model."), got, want)
        part = "vision_config" if name.startswith("model.vision_model.") else "perceiver_config / vision_config"
        return f"the config's {part} does not match the checkpoint's {name} ({list(got)})"


def _pixel_mask(mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        # Every batch from Idefics2Inputs carries one; without it the images were prepared as
        # one square image with another model's normalization, which would train silently wrong.
        raise ValueError(
            "the batch has no pixel_attention_mask: its images were not prepared by Idefics2's processor; build "
            "the dataset with inputs=engine.build.model_inputs(cfg) (VLMDataset(..., inputs=...)) and pass the "
            "batch's pixel_attention_mask to generate"
        )
    return mask


class Idefics2VisionLanguageModel(nn.Module):
    """The engine's view of Idefics2: `forward(batch) -> (loss, n_target_tokens)` and `generate`.

    `llm` is the whole HF-named model, so adapters are saved under PEFT's names for it.
    `connector` holds what trains in full besides the adapters (MiniGPT-v2's `llama_proj`,
    LLaVA's `mm_projector`); Med-Idefics trains Idefics2's connector through LoRA only, so it
    is empty here and a checkpoint's projection.safetensors holds no tensor.
    """

    def __init__(self, model: Idefics2ForConditionalGeneration) -> None:
        super().__init__()
        self.llm = model
        self.connector = nn.Module()

    @property
    def vit(self) -> SiglipVisionTransformer:
        """The vision tower (registered at `llm.model.vision_model`), where engine.distributed
        looks for a tower to shard as one unit."""
        return self.llm.model.vision_model

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over the batch's target tokens and their count, as
        `VisionLanguageModel.forward`: right-padded (or packed) rows need no attention mask, and
        the head runs on the target rows only (`LlamaForCausalLM.loss`)."""
        embeds = self.llm.embed(
            batch["input_ids"], batch["pixel_values"], _pixel_mask(batch.get("pixel_attention_mask")),
            batch["image_token_mask"], batch.get("image_rows"),
        )
        packing = packing_from_batch(batch)
        targets = TargetRows(batch["target_index"], batch["target_ids"]) if "target_index" in batch else None
        return self.llm.decoder.loss(
            batch.get("labels"),
            inputs_embeds=embeds,
            position_ids=batch.get("position_ids") if packing is not None else None,
            packing=packing,
            targets=targets,
        )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_token_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        eos_token_id: int | list[int],
        pad_token_id: int,
        pixel_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy decoding from left-padded prompts; returns only the new tokens."""
        embeds = self.llm.embed(input_ids, pixel_values, _pixel_mask(pixel_attention_mask), image_token_mask)
        return self.llm.decoder.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )


# ---------------------------------------------------------------- processing


@dataclass(frozen=True)
class Idefics2ImageProcessor:
    """One image -> its model inputs, as transformers' Idefics2ImageProcessor (PIL backend).

    Splitting cuts the image into its four quadrants (at width // 2, height // 2) followed by the
    whole image, before resizing. Each is resized (bilinear) so that its longer side is at most
    `longest_edge`, keeping the aspect ratio, and then each side is raised to at least
    `shortest_edge` (this one step may change the aspect ratio, as in transformers), rescaled
    to [0, 1] and normalized with mean and std 0.5.
    """

    do_image_splitting: bool = False
    shortest_edge: int = 378
    longest_edge: int = 980

    @property
    def n_images(self) -> int:
        return 5 if self.do_image_splitting else 1

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        aspect = width / height
        if width >= height and width > self.longest_edge:
            width = self.longest_edge
            height = int(width / aspect)
        elif height > width and height > self.longest_edge:
            height = self.longest_edge
            width = int(height * aspect)
        return max(height, self.shortest_edge), max(width, self.shortest_edge)

    def crops(self, image) -> list:
        if not self.do_image_splitting:
            return [image]
        w, h = image.size
        mid_w, mid_h = w // 2, h // 2
        boxes = ((0, 0, mid_w, mid_h), (mid_w, 0, w, mid_h), (0, mid_h, mid_w, h), (mid_w, mid_h, w, h))
        return [image.crop(box) for box in boxes] + [image]

    def __call__(self, image) -> list[torch.Tensor]:
        """A PIL image -> its `n_images` float `[3, h_i, w_i]` tensors (the sizes differ with
        splitting); `pad_images` batches them with their pixel masks."""
        from PIL import Image

        out = []
        for crop in self.crops(image.convert("RGB")):
            h, w = self.output_size(crop.height, crop.width)
            if (h, w) != (crop.height, crop.width):
                crop = crop.resize((w, h), Image.BILINEAR)
            # float64 rescale then float32, as transformers' rescale does, before normalizing.
            x = (np.asarray(crop, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
            x = torch.from_numpy(x).permute(2, 0, 1)
            mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(IMAGE_STD, dtype=torch.float32).view(3, 1, 1)
            out.append((x - mean) / std)
        return out


def pad_images(samples: Sequence[Sequence[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per sample, its images `[3, h, w]` -> `pixel_values [B, n, 3, H, W]` zero-padded at the
    bottom and right (and with all-zero padding images for samples with fewer than `n`), and
    `pixel_attention_mask [B, n, H, W]` (1 = real pixel), as transformers' processor pads."""
    n = max(len(images) for images in samples)
    height = max(img.shape[-2] for images in samples for img in images)
    width = max(img.shape[-1] for images in samples for img in images)
    pixels = torch.zeros(len(samples), n, 3, height, width)
    mask = torch.zeros(len(samples), n, height, width, dtype=torch.long)
    for i, images in enumerate(samples):
        for j, img in enumerate(images):
            h, w = img.shape[-2:]
            pixels[i, j, :, :h, :w] = img
            mask[i, j, :h, :w] = 1
    return {"pixel_values": pixels, "pixel_attention_mask": mask}


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(
            f"the tokenizer has no {token} token: Idefics2 prompts need {FAKE_IMAGE_TOKEN}, {IMAGE_TOKEN} and "
            f"{END_OF_UTTERANCE} (the Idefics2 folder's tokenizer has them; set model.tokenizer to it, or add them "
            "with tokenizer.add_special_tokens)"
        )
    return token_id


@dataclass(frozen=True)
class Idefics2Inputs:
    """How a sample becomes Idefics2's inputs: the engine's data hook (engine/data/collate.py).

    - `chat`: the prompt format (engine/data/prompts.py): `User:<image>...<end_of_utterance>
      \\nAssistant:`, the Idefics2 chat template's;
    - `process(image)`: the image processor's output for one PIL image;
    - `image_span(tokenizer)`: the ids that stand for the image and which of them the
      connector's output fills, `<fake_token_around_image>` + `image_seq_len` x `<image>` per image
      and a closing `<fake_token_around_image>`, as Idefics2Processor expands `<image>`;
    - `end_id(tokenizer)`: the token that ends a reply, `<end_of_utterance>`;
    - `collate(images)`: the batch's `pixel_values` and `pixel_attention_mask`.
    """

    processor: Idefics2ImageProcessor
    image_seq_len: int
    chat: str = "idefics2"

    @property
    def n_image_tokens(self) -> int:
        return self.image_seq_len * self.processor.n_images

    def process(self, image) -> list[torch.Tensor]:
        return self.processor(image)

    def image_span(self, tokenizer) -> tuple[list[int], list[bool]]:
        fake, image = _token_id(tokenizer, FAKE_IMAGE_TOKEN), _token_id(tokenizer, IMAGE_TOKEN)
        ids, mask = [], []
        for _ in range(self.processor.n_images):
            ids += [fake] + [image] * self.image_seq_len
            mask += [False] + [True] * self.image_seq_len
        return ids + [fake], mask + [False]

    def end_id(self, tokenizer) -> int:
        return _token_id(tokenizer, END_OF_UTTERANCE)

    def collate(self, images: Sequence[Sequence[torch.Tensor]]) -> dict[str, torch.Tensor]:
        return pad_images(images)
