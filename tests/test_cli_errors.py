"""Bad input at the command line: one line ``error: ...`` and exit 2 (130 on Ctrl-C), before Ray starts."""

from __future__ import annotations

import os

import pytest

from raycompat.cli import main
from raycompat.data.config import ProtocolConfig
from raycompat.data.datasets import load_digits
from raycompat.data.protocols import old_training_set
from raycompat.errors import ConfigError


def _run(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    return code, capsys.readouterr().err.splitlines()


def test_empty_config_is_refused(tmp_path, capsys):
    config = tmp_path / "empty.yaml"
    config.write_text("# nothing yet\n")
    code, err = _run(capsys, "eval", "--config", str(config))
    assert code == 2
    assert err == [f"error: {config}: the file is empty (or only comments); an all-defaults config must say so, "
                   "e.g. {}"]


def test_a_class_split_without_new_classes_is_refused():
    with pytest.raises(ConfigError, match=r"^protocol.old_classes: covers all 10 classes of the dataset, so no "
                                          r"class is new"):
        old_training_set(load_digits(), ProtocolConfig(old_classes=list(range(10))))


def test_a_new_model_named_like_the_old_one_is_refused(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nold: {{name: m}}\nnew: {{name: m}}\n")
    code, err = _run(capsys, "eval", "--config", str(config))
    assert code == 2
    assert err == [f"error: {config}: new.name: the new model is named 'm' like old.name: its export would "
                   "overwrite the old model's"]


@pytest.mark.parametrize("command", ["train-old", "eval"])
def test_output_dir_below_a_file_fails_before_ray_starts(tmp_path, capsys, command):
    import ray

    (tmp_path / "taken").write_text("a file")
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'taken' / 'run'}\ndata: {{name: digits}}\n")
    code, err = _run(capsys, command, "--config", str(config))
    assert code == 2
    assert err == [f"error: {config}: output_dir {tmp_path / 'taken' / 'run'}: {tmp_path / 'taken'} is a file, "
                   "not a directory"]
    assert not ray.is_initialized()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir_fails_before_ray_starts(tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o555)
    code, err = _run(capsys, "eval", "--config", str(_config(tmp_path)), "--out", str(tmp_path / "ro" / "run"))
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"error: --out {tmp_path / 'ro' / 'run'} is not writable")


def _config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\ndata: {{name: digits}}\n")
    return config


@pytest.mark.parametrize(("command", "stage", "line"), [
    ("eval", "stage_evaluate", "interrupted; run the same command again"),
    ("demo", "run_pipeline", "interrupted: the shards and epoch checkpoints committed so far stay under output_dir; "
                             "run the same command again to resume"),
])
def test_ctrl_c_exits_130_with_one_line_saying_what_is_kept(tmp_path, capsys, monkeypatch, command, stage, line):
    import raycompat.pipeline.run as run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, stage, interrupted)
    code, err = _run(capsys, command, "--config", str(_config(tmp_path)))
    # demo's progress bar also writes to stderr, without ending its line.
    assert code == 130 and any(text.endswith(line) for text in err) and not any("Traceback" in t for t in err)


def test_serve_extractor_on_a_busy_port_is_one_line(tmp_path, capsys, monkeypatch):
    import socket

    (tmp_path / "ones_extractor.py").write_text("import numpy as np\n\n\ndef ones(images):\n"
                                                "    return np.ones((len(images), 2), np.float32)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        code, err = _run(capsys, "serve-extractor", "--model", "ones_extractor:ones", "--port", str(port))
    finally:
        busy.close()
    assert code == 2
    assert err == [f"error: serve-extractor: cannot listen on 127.0.0.1:{port} (Address already in use)"]


def test_old_classes_with_a_data_split_is_refused(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nprotocol: {{kind: data_split, old_classes: [0, 1]}}\n")
    code, err = _run(capsys, "eval", "--config", str(config))
    assert code == 2
    assert err == [f"error: {config}: protocol.old_classes: only kind class_split uses it (kind is data_split, "
                   "which trains the old model on every class)"]
