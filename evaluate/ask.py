"""Ask one question about one image with a trained checkpoint.

    python -m evaluate.ask --checkpoint runs/demo --image scan.png --question "Is there a lesion?"
    python -m evaluate.ask --checkpoint runs/demo --image ct.dcm --report

PNG, JPEG and DICOM are read (DICOM through pydicom, windowed with the center and width from
its header). The checkpoint's `config.yaml` names the base model; `--report` writes a report
with the `[report]` prompt instead of answering a question. Errors (a missing checkpoint
file, an unreadable image) are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

import torch

from engine.config import load_config
from engine.data.collate import encode_prompt, generation_batch
from engine.data.images import ImageLoadError, load_image
from engine.data.prompts import build_prompt
from evaluate.answers import extract_answer
from evaluate.run import load_model_for_eval, resolve_checkpoint


def ask(checkpoint: str, image: str, question: str | None, *, report: bool = False, device: str = "cpu",
        max_new_tokens: int | None = None, overrides: list[str] = ()) -> str:
    path = resolve_checkpoint(checkpoint)
    cfg = load_config(path / "config.yaml", list(overrides))
    pixels = load_image(image, cfg.model.image_size)
    model, tokenizer = load_model_for_eval(cfg, path, device)
    task = "report" if report else "vqa"
    from engine.build import n_image_tokens

    ids, mask = encode_prompt(tokenizer, build_prompt(task, question, cfg.data.template), n_image_tokens(cfg))
    batch = generation_batch(
        [{"pixel_values": pixels, "input_ids": torch.tensor(ids), "image_token_mask": torch.tensor(mask), "index": 0}],
        tokenizer.pad_token_id,
    )
    with torch.no_grad():
        tokens = model.generate(
            batch["pixel_values"].to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device),
            batch["image_token_mask"].to(device), max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    reply = tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True)
    return reply.strip() if report else extract_answer(reply)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Answer one question about one image")
    parser.add_argument("--checkpoint", required=True, help="a step_N folder or a run's output_dir")
    parser.add_argument("--image", required=True, help="PNG, JPEG or DICOM")
    parser.add_argument("--question")
    parser.add_argument("--report", action="store_true", help="write a report instead of answering")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-new-tokens", type=int)
    args = parser.parse_args(argv)
    if not args.report and not args.question:
        parser.error("give --question, or --report")
    try:
        print(ask(args.checkpoint, args.image, args.question, report=args.report, device=args.device,
                  max_new_tokens=args.max_new_tokens))
    except (FileNotFoundError, ImageLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
