"""Security: no unpickling of user files, safe YAML, dashboards on 127.0.0.1, masked passwords."""

from __future__ import annotations

import pickle
import re
import shutil

import pytest

from automl_diff.errors import UserError
from tests.conftest import REPO


class _Payload:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_are_refused_not_loaded(tiny_teacher_dir, tmp_path):
    from automl_diff.models.loading import load_teacher, load_unet

    folder = tmp_path / "model"
    shutil.copytree(tiny_teacher_dir, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    for load in (lambda: load_unet(folder), lambda: load_teacher(str(folder))):
        with pytest.raises(UserError, match="diffusion_pytorch_model.safetensors is missing"):
            load()
    assert not marker.exists()


def test_yaml_python_tags_are_rejected(tmp_path):
    from automl_diff.config import load_study_config

    path = tmp_path / "evil.yaml"
    marker = tmp_path / "ran"
    path.write_text(f"method: dkdm\nteacher: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError, match=r"evil\.yaml: invalid YAML"):
        load_study_config(path)
    assert not marker.exists()


def test_the_package_source_never_unpickles():
    pattern = re.compile(r"pickle\.loads?\(|yaml\.load\(|yaml\.unsafe_load|torch\.load\((?![^)]*weights_only=True)")
    offenders = [
        f"{p.relative_to(REPO)}:{i}"
        for p in (REPO / "automl_diff").rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_dashboard_listens_on_loopback_unless_asked(tmp_path, monkeypatch, caplog):
    import socket

    import optuna
    import optuna_dashboard

    from automl_diff.cli import main

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(storage=storage, study_name="s")
    served = []
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda storage, host, port, **kw: served.append((host, port)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["dashboard", "--storage", storage, "--port", str(port)]) == 0
    assert served == [("127.0.0.1", port)] and "anyone who can reach" not in caplog.text
    assert main(["dashboard", "--storage", storage, "--port", str(port), "--host", "0.0.0.0"]) == 0
    assert served[-1] == ("0.0.0.0", port) and "anyone who can reach this address" in caplog.text


def test_log_lines_mask_storage_passwords(capfd):
    import logging

    from automl_diff.cli import app as cli

    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        cli._configure_logging(False)
        logging.getLogger("automl_diff").warning("worker joined %s", "postgresql://u:hunter2@db.example/studies")
    finally:
        root.removeHandler(handler)
    err = capfd.readouterr().err
    assert "hunter2" not in err and "postgresql://u:***@db.example/studies" in err
