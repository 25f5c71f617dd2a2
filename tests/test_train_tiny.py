"""scripts/train_tiny.py end to end at toy size: split, tokenizer, checkpoints, resume, and a
Hugging Face checkpoint that cormlm loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from train_tiny import is_held_out, stdlib_files

import cormlm

ROOT = Path(__file__).resolve().parent.parent

TOY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate", "64",
       "--context", "64", "--seq", "32", "--long-seq-steps", "2", "--batch", "2", "--vocab", "300",
       "--checkpoint-every", "2", "--warmup", "1", "--device", "cpu"]


def _toy_stdlib(folder: Path) -> Path:
    """A few real stdlib files, some held out, plus a test folder that must be skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in stdlib_files(root) if p.stat().st_size < 6000]
    rel = [p.relative_to(root).as_posix() for p in files]
    chosen = [f for f, r in zip(files, rel) if not is_held_out(r)][:12] + \
             [f for f, r in zip(files, rel) if is_held_out(r)][:2]
    for path in chosen:
        target = folder / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (folder / "test").mkdir()
    (folder / "test" / "test_never.py").write_text("x = 1\n")
    return folder


def _run(args: list[str]) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny.py"), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_train_resume_and_load(tmp_path):
    stdlib = _toy_stdlib(tmp_path / "lib")
    out = tmp_path / "out"
    first = _run(["--stdlib", str(stdlib), "--out", str(out), "--steps", "4", *TOY])
    assert "data: 12 training files, 2 held-out files" in first  # the test folder was skipped
    assert (out / "train_state.pt").is_file() and "held-out loss" in first
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["held_out_tokens"] > 0

    second = _run(["--stdlib", str(stdlib), "--out", str(out), "--steps", "6", *TOY])
    assert "tokenizer: reusing" in second and "resumed from" in second and "at step 4" in second
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 6

    model = cormlm.load_model(out)
    assert (model.config.num_heads, model.config.num_kv_heads, model.config.context_length) == (2, 1, 64)
    tok = cormlm.load_tokenizer(out)
    result = cormlm.generate(model, [tok.encode("def f():")], max_new_tokens=4)
    assert len(result.new_tokens[0]) <= 4


def test_bad_stdlib_folder_is_one_clear_line(tmp_path):
    for folder, needle in ((tmp_path / "absent", "is not a folder"), (tmp_path, "0 training and 0 held-out")):
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny.py"), "--stdlib", str(folder),
                               "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and needle in done.stderr and "Traceback" not in done.stderr
