"""The user's mistakes through `pefomed eval | ask | score`: exit status 2 and exactly one line on
stderr, `error: ...`, naming the file and the fix; with `--debug`, the traceback instead.

The commands run in this process through `pefomed.cli.main` (the `cli` fixture); one test runs the
console entry point in a subprocess to see the real stderr of both modes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from pefomed.engine.checkpoint import COMPLETE_MARK
from pefomed.models.loading import CheckpointError


def one_error_line(err: str) -> str:
    """The single `error:` line of stderr; fails on anything else (a traceback, a log line)."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def copy_checkpoint(tiny, dest, *, complete: bool = True, drop: tuple[str, ...] = ()):
    shutil.copytree(tiny["step"], dest)
    if not complete:
        (dest / COMPLETE_MARK).unlink()
    for name in drop:
        (dest / name).unlink()
    return dest


def eval_args(checkpoint, out, *extra):
    return ("eval", "--checkpoint", checkpoint, "--out", out, *extra)


def ask_args(tiny, checkpoint, *extra):
    return ("ask", "--checkpoint", checkpoint, "--image", tiny["test"][0].image_path, "--question",
            "is there a lesion?", *extra)


# ---------------------------------------------------------------- unusable checkpoint folders


@pytest.mark.parametrize("command", ["eval", "ask"])
def test_a_folder_without_its_complete_marker_is_refused(tiny, tmp_path, cli, command):
    # A run stopped while saving: all files there, but no COMPLETE marker.
    folder = copy_checkpoint(tiny, tmp_path / "run" / "checkpoints" / "step_8", complete=False)
    args = eval_args(folder, tmp_path / "out") if command == "eval" else ask_args(tiny, folder)
    code, out, err = cli(*args)
    line = one_error_line(err)
    assert code == 2 and out == "" and str(folder) in line
    assert COMPLETE_MARK in line and "complete step_N folder" in line  # what is wrong, and the fix
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["eval", "ask"])
def test_a_tmp_folder_is_refused_even_with_its_marker(tiny, tmp_path, cli, command):
    # Killed between writing COMPLETE and the rename: still step_N.tmp, never to be used.
    folder = copy_checkpoint(tiny, tmp_path / "run" / "checkpoints" / "step_9.tmp")
    assert (folder / COMPLETE_MARK).is_file()
    args = eval_args(folder, tmp_path / "out") if command == "eval" else ask_args(tiny, folder)
    code, out, err = cli(*args)
    line = one_error_line(err)
    assert code == 2 and out == "" and str(folder) in line and ".tmp" in line and "complete step_N folder" in line


def test_the_refusal_points_at_the_latest_complete_checkpoint(tiny, tmp_path, cli):
    done = copy_checkpoint(tiny, tmp_path / "run" / "checkpoints" / "step_7")
    partial = copy_checkpoint(tiny, tmp_path / "run" / "checkpoints" / "step_8", complete=False)
    code, _, err = cli(*eval_args(partial, tmp_path / "out"))
    assert code == 2 and f"the latest complete one is {done}" in one_error_line(err)


def test_a_run_without_a_complete_checkpoint_is_refused(tiny, tmp_path, cli):
    run = tmp_path / "run"
    copy_checkpoint(tiny, run / "checkpoints" / "step_8", complete=False)
    copy_checkpoint(tiny, run / "checkpoints" / "step_9.tmp")
    code, _, err = cli(*eval_args(run, tmp_path / "out"))
    line = one_error_line(err)
    assert code == 2 and str(run / "checkpoints") in line and "no complete step_N checkpoint" in line


@pytest.mark.parametrize("command", ["eval", "ask"])
@pytest.mark.parametrize("missing", ["adapter_model.safetensors", "projection.safetensors"])
def test_missing_checkpoint_files_are_named(tiny, tmp_path, cli, command, missing):
    folder = copy_checkpoint(tiny, tmp_path / "step_7", drop=(missing,))
    args = eval_args(folder, tmp_path / "out") if command == "eval" else ask_args(tiny, folder)
    code, _, err = cli(*args)
    line = one_error_line(err)
    assert code == 2 and str(folder / missing) in line and "copy the whole step_N folder" in line


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "projection.safetensors"])
def test_a_truncated_checkpoint_file_is_named(tiny, tmp_path, cli, damaged):
    folder = copy_checkpoint(tiny, tmp_path / "step_7")
    data = (folder / damaged).read_bytes()
    (folder / damaged).write_bytes(data[: len(data) // 2])
    code, _, err = cli(*eval_args(folder, tmp_path / "out"))
    line = one_error_line(err)
    assert code == 2 and str(folder / damaged) in line


def test_a_checkpoint_that_does_not_exist(tmp_path, cli):
    code, _, err = cli(*eval_args(tmp_path / "nowhere", tmp_path / "out"))
    assert code == 2 and str(tmp_path / "nowhere") in one_error_line(err)
    (tmp_path / "empty").mkdir()
    code, _, err = cli(*eval_args(tmp_path / "empty", tmp_path / "out"))
    assert code == 2 and "empty: neither a checkpoint folder" in one_error_line(err)


# ---------------------------------------------------------------- splits, options, images


def test_a_split_the_dataset_lacks_names_the_files_it_has(tiny, tmp_path, cli):
    # The synthetic dataset has trainset.json and testset.json, no validation split: --split val
    # must fail naming what exists, never fall back to another split.
    assert (tiny["data"] / "trainset.json").is_file() and (tiny["data"] / "testset.json").is_file()
    assert not list(tiny["data"].glob("val*"))
    code, out, err = cli(*eval_args(tiny["step"], tmp_path / "out", "--split", "val"))
    line = one_error_line(err)
    assert code == 2 and out == "" and "val" in line
    assert "trainset.json" in line and "testset.json" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, message", [
    (("--dataset", "pathvqa"), "--dataset 'pathvqa': expected kind:path"),
    (("--prompt", "nonsense"), "prompt variant 'nonsense' (--prompt / eval.prompt): expected one of"),
    (("eval.prompt=nonsense",), "eval.prompt='nonsense'"),  # the config check says it (engine.config)
])
def test_bad_options(tiny, tmp_path, cli, option, message):
    code, _, err = cli(*eval_args(tiny["step"], tmp_path / "out", *option))
    assert code == 2 and message in one_error_line(err)


def test_eval_with_no_image_found_stops_before_loading_the_model(tiny, tmp_path, cli):
    data = tmp_path / "vqa"
    data.mkdir()
    shutil.copy(tiny["data"] / "testset.json", data / "testset.json")  # the images are not copied
    first = json.loads((data / "testset.json").read_text())[0]["image_name"]
    code, _, err = cli(*eval_args(tiny["step"], tmp_path / "out", "--dataset", f"vqa_rad:{data}"))
    line = one_error_line(err)
    assert code == 2 and str(data / "images" / first) in line and "image_root" in line


def test_ask_missing_image(tiny, tmp_path, cli):
    code, _, err = cli("ask", "--checkpoint", tiny["step"], "--image", tmp_path / "scan.png", "--question", "q?")
    assert code == 2 and one_error_line(err) == f"error: {tmp_path / 'scan.png'}: image file not found"


def test_ask_undecodable_png(tiny, tmp_path, cli):
    garbage = tmp_path / "scan.png"
    garbage.write_bytes(b"garbage")
    code, _, err = cli("ask", "--checkpoint", tiny["run"], "--image", garbage, "--question", "q?")
    assert code == 2 and one_error_line(err).startswith(f"error: {garbage}: cannot decode the image")


def test_ask_dcm_that_is_not_dicom(tiny, tmp_path, cli):
    pytest.importorskip("pydicom")
    fake = tmp_path / "ct.dcm"
    fake.write_bytes(b"\x89PNG not a DICOM file at all" * 10)
    code, _, err = cli("ask", "--checkpoint", tiny["step"], "--image", fake, "--report")
    assert code == 2 and one_error_line(err).startswith(f"error: {fake}: ")


# ---------------------------------------------------------------- predictions files


def test_score_missing_predictions_file(tmp_path, cli):
    code, out, err = cli("score", "--predictions", tmp_path / "preds.jsonl", "--out", tmp_path / "out")
    assert code == 2 and out == ""
    assert one_error_line(err) == f"error: {tmp_path / 'preds.jsonl'}: predictions file not found"


def test_score_bad_jsonl_line_names_file_and_line(tmp_path, cli):
    preds = tmp_path / "preds.jsonl"
    preds.write_text('{"prediction": "yes", "answer": "yes"}\n{"prediction": "no", "answer": \n')
    code, _, err = cli("score", "--predictions", preds, "--out", tmp_path / "out")
    line = one_error_line(err)
    assert code == 2 and line.startswith(f"error: {preds}: line 2 is not valid JSON")
    preds.write_text('{"prediction": "yes", "answer": "yes"}\n{"prediction": 3, "answer": "no"}\n')
    code, _, err = cli("score", "--predictions", preds, "--out", tmp_path / "out")
    assert code == 2 and f"{preds}: line 2: field 'prediction' must be a string" in one_error_line(err)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- --debug


def test_debug_raises_instead(tiny, tmp_path, cli):
    folder = copy_checkpoint(tiny, tmp_path / "step_8", complete=False)
    with pytest.raises(CheckpointError, match=COMPLETE_MARK):
        cli(*eval_args(folder, tmp_path / "out"), "--debug")
    with pytest.raises(FileNotFoundError, match="predictions file not found"):
        cli("score", "--predictions", tmp_path / "none.jsonl", "--out", tmp_path / "o", "--debug")


def test_console_stderr_one_line_or_traceback(tmp_path):
    argv = [sys.executable, "-m", "pefomed", "score", "--predictions", str(tmp_path / "none.jsonl"), "--out",
            str(tmp_path / "o")]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr == f"error: {tmp_path / 'none.jsonl'}: predictions file not found\n"
    debug = subprocess.run([*argv, "--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and debug.stderr.startswith("Traceback (most recent call last):")
    assert debug.stderr.rstrip().endswith(f"FileNotFoundError: {tmp_path / 'none.jsonl'}: predictions file not found")
