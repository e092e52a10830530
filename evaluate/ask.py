"""Ask one question about one image with a trained checkpoint, or have it write a report.

    python -m pefomed.evaluate.ask --checkpoint runs/demo --image scan.png --question "is there a lesion?"
    python -m pefomed.evaluate.ask --checkpoint runs/demo --image ct.dcm --report

`--checkpoint` is a complete `step_N` folder or a run's output_dir (its latest complete checkpoint); the
checkpoint's `config.yaml` names the base model unless `--config` is given. PNG, JPEG and DICOM
are read by `engine/data/images.py` (DICOM through pydicom: modality rescale, then the window
centre and width from its header). The prompt is the evaluation template (`eval.prompt`, or
`--prompt`); the answer is extracted from the reply by `evaluate/answers.py` (a question opening
with "is", "does", "can", ... counts as a closed yes/no question), while `--report`
uses the `[report]` prompt and prints the whole report. A missing or incomplete checkpoint, or a
missing or unreadable image, is one `error:` line on stderr naming the file, and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from pefomed.engine.data.collate import generation_batch
from pefomed.engine.data.images import ImageLoadError, load_image
from pefomed.engine.data.readers import Sample
from pefomed.engine.data.sources import build_dataset
from pefomed.errors import run_cli
from pefomed.evaluate.answers import clean_reply, extract_answer, guess_answer_type
from pefomed.evaluate.run import (
    decode_batch,
    eval_template,
    load_eval_config,
    load_model_for_eval,
    resolve_checkpoint,
    resolve_device,
    stop_token_ids,
)


def ask(checkpoint: str | Path, image: str | Path, question: str | None = None, *, report: bool = False,
        config: str | Path | None = None, prompt: str | None = None, device: str | None = None,
        max_new_tokens: int | None = None, overrides: Sequence[str] = ()) -> str:
    """The answer to `question` about `image` (or, with `report`, the report it writes)."""
    if not report and not (question and question.strip()):
        raise ValueError("give a question, or ask for a report")
    folder = resolve_checkpoint(checkpoint)
    cfg = load_eval_config(folder, config, overrides)
    # Read the image before building the model, so a bad file fails in a second.
    load_image(image, cfg.model.image_size)
    task = "report" if report else "vqa"
    template = eval_template(cfg, prompt)
    run_device = resolve_device(cfg, device)
    model, tokenizer = load_model_for_eval(cfg, folder, run_device)
    # The same path as `pefomed eval`: the dataset builds the prompt and the model's own image
    # inputs (a square for MiniGPT-v2 and LLaVA, Idefics2's crops and pixel mask).
    sample = Sample(image_path=str(image), prompt_kind=task, question=None if report else question.strip(), answer="")
    run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, template=template))
    item = build_dataset([sample], run_cfg, tokenizer, train=False)[0]
    if "bad" in item:
        raise ImageLoadError(item["bad"])
    batch = generation_batch([item], tokenizer.pad_token_id)
    reply = decode_batch(model, tokenizer, batch, max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens,
                         device=run_device, stop_ids=stop_token_ids(tokenizer))[0]
    return clean_reply(reply) if report else extract_answer(reply, guess_answer_type(question), question)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Answer one question about one image (PNG, JPEG or DICOM)")
    parser.add_argument("--checkpoint", required=True, help="a step_N folder or a run's output_dir")
    parser.add_argument("--image", required=True, help="PNG, JPEG or DICOM (.dcm)")
    parser.add_argument("--question")
    parser.add_argument("--report", action="store_true", help="write a report instead of answering")
    parser.add_argument("--config", help="run config (default: the checkpoint's config.yaml)")
    parser.add_argument("--prompt", help="prompt variant (default: eval.prompt of the config)")
    parser.add_argument("--device", help="cpu or cuda (default: train.device of the config)")
    parser.add_argument("--max-new-tokens", type=int, help="default: eval.max_new_tokens")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.tokenizer=/models/llama/")
    args = parser.parse_args(argv)
    if args.report == bool(args.question):
        parser.error("give either --question or --report")
    answer = ask(args.checkpoint, args.image, args.question, report=args.report, config=args.config,
                 prompt=args.prompt, device=args.device, max_new_tokens=args.max_new_tokens, overrides=args.overrides)
    print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
