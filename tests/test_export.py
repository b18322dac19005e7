"""Exports load with the call ``export`` prints, in a Python that cannot import automl_diff."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
import yaml

from automl_diff.cli import main
from automl_diff.records import TrialAttr
from tests.conftest import printed_load_calls, sample_without_automl_diff, write_study


@pytest.mark.parametrize(("layers", "expected"), [(1, "UNet2DModel"), (2, "StudentUNet2DModel")])
def test_dkdm_export_loads_with_diffusers_alone(tmp_path, tiny_teacher_dir, capsys, layers, expected):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"family": "unet2d", "blocks": {"down.1": {"channels": [16], "layers": [layers]}}}))
    config = write_study(tmp_path, tiny_teacher_dir, space, n_trials=1)
    assert main(["run", str(config), "--quiet"]) == 0
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    capsys.readouterr()
    assert main(["export", "--storage", storage, "--pareto", "--out", str(tmp_path / "exports")]) == 0
    out = capsys.readouterr().out
    (call,) = printed_load_calls(out)
    folder = tmp_path / "exports" / "trial_0"
    index = json.loads((folder / "model_index.json").read_text())
    if expected == "UNet2DModel":  # stock diffusers expresses it: no custom code, no trust_remote_code
        assert index["unet"] == ["diffusers", "UNet2DModel"] and "trust_remote_code" not in call
        assert not (folder / "unet" / "student_unet.py").exists()
    else:
        assert index["unet"] == ["student_unet", "StudentUNet2DModel"] and "trust_remote_code=True" in call
        assert "trust_remote_code=True" in (folder / "README.md").read_text()
    seen = sample_without_automl_diff(call, cwd=tmp_path)
    assert seen == {"unet": expected, "unet_module": seen["unet_module"], "shape": [2, 16, 16, 1], "imported": []}

    # where automl_diff is installed the same call loads the same weights as the trial's
    import diffusers  # noqa: F401 - the printed call names it

    from automl_diff.models import load_unet

    pipe = eval(call)
    study = optuna.load_study(study_name="tiny", storage=storage)
    original = load_unet(study.trials[0].user_attrs[TrialAttr.WEIGHTS]).state_dict()
    exported = pipe.unet.state_dict()
    assert list(original) == list(exported)
    assert all(torch.equal(original[name], exported[name]) for name in original)


def test_student_that_stock_diffusers_expresses_is_exported_plain(tmp_path):
    from automl_diff.models.student import StudentUNet2DModel, plain_config
    from tests.conftest import TINY_UNET

    uniform = StudentUNet2DModel(**{**TINY_UNET, "layers_per_block": [1, 1]})
    plain = plain_config(dict(uniform.config))
    assert plain is not None and plain["_class_name"] == "UNet2DModel" and plain["layers_per_block"] == 1
    from diffusers import UNet2DModel

    UNet2DModel.from_config(plain).load_state_dict(uniform.state_dict(), strict=True)
    assert plain_config(dict(StudentUNet2DModel(**{**TINY_UNET, "layers_per_block": [1, 2]}).config)) is None
    narrowed = StudentUNet2DModel(**{**TINY_UNET, "resnet_widths": {"up.0.resnets.0": 8}})
    assert plain_config(dict(narrowed.config)) is None
