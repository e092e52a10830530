"""Prompt templates of the recipes (MiniGPT-v2 / PeFoMed, and Med-Idefics' expert variant).

Every prompt is `<s>[INST] <Img><ImageHere></Img> [task] instruction [/INST]`. `<s>` stands for
the tokenizer's BOS token (the collate code emits exactly one BOS, whatever the tokenizer adds
on its own) and `<ImageHere>` for the image's placeholder tokens, which the connector's output
replaces. The target that follows is the answer, caption or report, ended by `</s>` (EOS).

Templates are chosen by name (`data.template`):
- `minigptv2`: `[vqa] Based on the image, respond to this question with a short answer: {q}`.
  In training MiniGPT-v2 sometimes draws the short form `[vqa] {q}` instead
  (`short_prompt_prob`).
- `expert`: Med-Idefics' ablation, which prefixes each question with "You are an expert
  radiologist evaluating the case, answer the question succinctly based on the medical image."
- `short`: always `[vqa] {q}`.
Captions and reports take an instruction from a small pool (PeFoMed draws one at random for each
training sample; evaluation uses the first one, so its prompts are reproducible).
"""

from __future__ import annotations

import random

IMAGE_PLACEHOLDER = "<ImageHere>"
BOS_TEXT = "<s>"
EOS_TEXT = "</s>"
WRAPPER = "<s>[INST] <Img><ImageHere></Img> [{task}] {instruction} [/INST]"
# The chat format of the model, chosen by its architecture (engine.build.model_inputs), around
# the template's instruction. Idefics2's chat template has no task tag and ends turns with
# <end_of_utterance>; its processor expands the image placeholder.
CHATS = {
    "minigptv2": WRAPPER,
    "idefics2": "<s>User:<ImageHere>{instruction}<end_of_utterance>\nAssistant:",
    # SmolLM2-Instruct's ChatML with the default system turn its chat template adds; `<s>` is the
    # tokenizer's BOS, which for SmolLM2 is <|im_start|>, and the reply ends with <|im_end|> (EOS).
    "smollm2": "<s>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
               "<|im_start|>user\n<ImageHere>\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
}

VQA_INSTRUCTIONS = {
    "minigptv2": "Based on the image, respond to this question with a short answer: {q}",
    "expert": "You are an expert radiologist evaluating the case, answer the question succinctly "
              "based on the medical image. {q}",
    "short": "{q}",
    # LLaVA-1.5's short-answer instruction, in SmolLM2-Instruct's chat format (TEMPLATE_CHATS).
    "smollm2": "{q}\nAnswer the question using a single word or phrase.",
}
TEMPLATES = tuple(VQA_INSTRUCTIONS)
# A template written for one model's chat format brings that format with it.
TEMPLATE_CHATS = {"smollm2": "smollm2"}
CAPTION_INSTRUCTIONS = (
    "Briefly describe this image.",
    "Provide a concise depiction of this image.",
    "Present a short description of this image.",
    "Summarize this image in a few words.",
)
REPORT_INSTRUCTIONS = (
    "Describe the given chest x-ray image in detail.",
    "Take a look at this chest x-ray and describe the findings and impression.",
    "What are the key findings in this chest x-ray image?",
)
REPORT_INSTRUCTION = REPORT_INSTRUCTIONS[0]
EXPERT_PREFIX = "You are an expert radiologist."
TASKS = ("vqa", "caption", "report")


def check_template(template: str) -> str:
    if template not in VQA_INSTRUCTIONS:
        raise ValueError(f"prompt template {template!r}: expected one of {', '.join(TEMPLATES)} (data.template)")
    return template


def _pick(pool: tuple[str, ...], rng: random.Random | None) -> str:
    return pool[rng.randrange(len(pool))] if rng is not None else pool[0]


def instruction(task: str, question: str | None, template: str = "minigptv2", rng: random.Random | None = None,
                short_prompt_prob: float = 0.0) -> str:
    """The text between `[task]` and `[/INST]`; `rng` is given in training only."""
    check_template(template)
    if task == "vqa":
        if question is None or not str(question).strip():
            raise ValueError("a vqa prompt needs a non-empty question")
        use_short = rng is not None and short_prompt_prob > 0 and rng.random() < short_prompt_prob
        return VQA_INSTRUCTIONS["short" if use_short else template].format(q=str(question).strip())
    if task in ("caption", "report"):
        text = _pick(CAPTION_INSTRUCTIONS if task == "caption" else REPORT_INSTRUCTIONS, rng)
        return f"{EXPERT_PREFIX} {text}" if template == "expert" else text
    raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")


def build_prompt(task: str, question: str | None = None, template: str = "minigptv2",
                 rng: random.Random | None = None, short_prompt_prob: float = 0.0, chat: str = "minigptv2") -> str:
    """The full prompt text, `<s>[INST] <Img><ImageHere></Img> [task] ... [/INST]`.

    In training pass a seeded `rng`: it draws the short `[vqa] {q}` form with probability
    `short_prompt_prob` and the caption/report instruction from its pool. Without `rng` (in
    evaluation) the prompt is fixed.
    """
    chat = TEMPLATE_CHATS.get(template, chat)
    if chat not in CHATS:
        raise ValueError(f"chat format {chat!r}: expected one of {', '.join(CHATS)}")
    return CHATS[chat].format(task=task, instruction=instruction(task, question, template, rng, short_prompt_prob))
