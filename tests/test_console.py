"""The demo's console: one live line and the summary; Ray's, Ray Data's, faiss's and the warnings' chatter in a log file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raycompat.cli.console import LiveLine

REPO = Path(__file__).resolve().parents[1]

# What must not reach the console, by source.
CHATTER = {
    "faiss loader": re.compile(r"Loading faiss|Successfully loaded faiss|Could not load library|swigfaiss"),
    "Python warnings": re.compile(r"Warning|warnings\.warn"),
    "Ray worker prefix": re.compile(r"\([^()]*pid=\d+"),
    "Ray Data progress": re.compile(r"logging_progress|Running Dataset|Total Progress|streaming_executor|Execution plan"),
    "Ray core": re.compile(r"core_worker\.cc|PreemptionWatcher|Found multiple active Ray instances"),
    "Ray auth": re.compile(r"token", re.IGNORECASE),
    "Ray logging": re.compile(r"\t(INFO|WARNING|ERROR) \w+\.py:\d+ --"),
}


def test_live_line_shows_epoch_and_loss_of_rank_0_and_rows_per_second():
    import io

    stream = io.StringIO()
    live = LiveLine(["train new model", "extract new features"], {"train new model": 3}, stream)
    live.stage("train new model")
    live.worker_lines(["rank 1 epoch 2: {'loss': 9.0}", "rank 0 epoch 2: {'epoch': 2, 'loss': 1.23456, 'ce': 1.0}"])
    assert "train new model: epoch 2/3, loss 1.2346" in stream.getvalue()
    live.stage("extract new features")
    live.total = 10
    live.update(4)
    live.worker_lines(["rank 0 epoch 5: {'loss': 0.5}"])  # not a training stage: ignored
    live.close()
    text = stream.getvalue()
    assert "extract new features: 4/10 rows" in text and "rows/s" in text and "epoch 5" not in text


def test_live_line_steps_advance_per_unit():
    import io

    stream = io.StringIO()
    live = LiveLine(["gen1", "gen2"], {"gen2: train": 4}, stream, desc="chain", unit="generation")
    live.step("gen1: train")
    live.step("gen1: extract test features")
    live.step("gen2: train")
    live.worker_lines(["rank 0 epoch 3: {'loss': 0.5}"])
    text = stream.getvalue()
    assert "1/2" in text and "gen1: extract test features" in text and "gen2: train: epoch 3/4, loss 0.5000" in text
    assert "2/2" not in text  # gen2 still running
    live.close()
    assert "2/2" in stream.getvalue()


def test_quiet_console_sends_chatter_to_the_log_and_keeps_our_warnings(tmp_path, capfd):
    import logging
    import warnings

    from raycompat.cli.console import quiet_console

    log_file = tmp_path / "logs" / "run.log"
    with quiet_console(log_file, ["only stage"], {}) as console:
        console.live.stage("only stage")
        logging.getLogger("faiss.loader").info("Loading faiss with AVX2 support.")
        logging.getLogger("raycompat.data").info("dataset digits: 10 train")
        logging.getLogger("raycompat.data").warning("falling back to the bundled digits dataset")
        warnings.warn("a library's FutureWarning", FutureWarning)
        os.write(2, b"[E core_worker.cc:1] C++ chatter on fd 2\n")
    err = capfd.readouterr().err
    assert "warning: falling back to the bundled digits dataset" in err and "only stage" in err
    for chatter in ("Loading faiss", "dataset digits: 10 train", "FutureWarning", "core_worker"):
        assert chatter not in err, chatter
    log = log_file.read_text()
    for line in ("faiss.loader: Loading faiss with AVX2 support.", "raycompat.data: dataset digits: 10 train",
                 "falling back to the bundled digits dataset", "FutureWarning: a library's FutureWarning",
                 "C++ chatter on fd 2"):
        assert line in log, line
    # Afterwards the console is the console again.
    os.write(2, b"after\n")
    assert "after" in capfd.readouterr().err and "after" not in log_file.read_text()


def tiny_demo_config(out: Path) -> dict:
    """The demo on a few hundred digits, one epoch per model, one worker."""
    return {
        "output_dir": str(out), "seed": 0,
        "data": {"name": "digits", "max_train": 400, "max_test": 200},
        "protocol": {"kind": "class_split", "old_classes": [0, 1, 2, 3, 4]},
        "old": {"model": {"arch": "small_cnn", "width": 8, "embed_dim": 16}, "optim": {"epochs": 1}},
        "new": {"method": "nifcl", "model": {"arch": "small_cnn", "width": 8, "embed_dim": 16},
                "optim": {"epochs": 1}},
        "extract": {"batch_size": 256, "concurrency": 1},
        "ray": {"num_workers": 1, "cpus_per_worker": 1},
    }


@pytest.mark.ray
def test_demo_console_holds_only_the_live_line_and_the_summary(tmp_path):
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(tiny_demo_config(tmp_path / "run")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "raycompat", "demo", "--config", str(config)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # tqdm redraws the live line with \r: each redraw is a line here.
    lines = (proc.stdout + "\n" + proc.stderr).replace("\r", "\n").splitlines()
    leaked = [(source, line) for line in lines for source, pattern in CHATTER.items() if pattern.search(line)]
    assert not leaked, leaked[:10]
    # stderr: the log's path, then the live line only.
    err = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert err[0].startswith("log: ") and all(ln.startswith("demo:") for ln in err[1:]), err[:5]
    assert any("train new model: epoch 1/1, loss" in ln for ln in err)
    assert any(re.search(r"extract old features: 399/399 rows, \d+ rows/s", ln) for ln in err)
    assert "# raycompat report" in proc.stdout
    log_file = Path(err[0][len("log: "):])
    assert log_file.parent == tmp_path / "run" / "logs" and f"  log      {log_file}" in proc.stdout
    log = log_file.read_text()
    # The chatter is in the log: the Train workers' and the extraction actors' output, the warnings.
    # (Extraction and transform run on Ray core actors, not Ray Data: no executor blocks to divert.)
    for needle in ("(RayTrainWorker pid=", "rank 0 epoch 1:", "(_PoolActor pid=", "FutureWarning"):
        assert needle in log, needle
    assert "not writable" not in log  # mended at the source (the extractor copies read-only batches)
