"""Prompt templates of the recipes. `<s>` stands for the tokenizer's BOS token, and
`<ImageHere>` for the image's placeholder tokens, which the connector's output replaces."""

from __future__ import annotations

import random

IMAGE_PLACEHOLDER = "<ImageHere>"

VQA_INSTRUCTIONS = {
    "minigptv2": "Based on the image, respond to this question with a short answer: {q}",
    "expert": "You are an expert radiologist. Based on the image, respond to this question with a short answer: {q}",
    "short": "{q}",
}
CAPTION_INSTRUCTION = "Briefly describe this image."
REPORT_INSTRUCTION = "Write a radiology report for this image."
WRAPPER = "<s>[INST] <Img><ImageHere></Img> [{task}] {instruction} [/INST]"


def build_prompt(task: str, question: str | None, template: str = "minigptv2", rng: random.Random | None = None,
                 short_prompt_prob: float = 0.0) -> str:
    """The full prompt text; in training MiniGPT-v2 sometimes draws the short `[vqa] {q}` form."""
    if task == "vqa":
        if template not in VQA_INSTRUCTIONS:
            raise ValueError(f"prompt template {template!r}: expected one of {sorted(VQA_INSTRUCTIONS)}")
        name = "short" if rng is not None and short_prompt_prob > 0 and rng.random() < short_prompt_prob else template
        return WRAPPER.format(task="vqa", instruction=VQA_INSTRUCTIONS[name].format(q=question))
    if task == "caption":
        return WRAPPER.format(task="caption", instruction=CAPTION_INSTRUCTION)
    if task == "report":
        return WRAPPER.format(task="report", instruction=REPORT_INSTRUCTION)
    raise ValueError(f"task {task!r}: expected vqa, caption or report")
