from __future__ import annotations

import pytest
import yaml

from automl_diff.config import load_study_config
from automl_diff.errors import UserError
from tests.conftest import REPO


def test_shipped_study_configs_load(tmp_path):
    (tmp_path / "studies" / "prompts").mkdir(parents=True)
    for name in ("digits_train.txt", "digits_eval.txt"):
        (tmp_path / "studies" / "prompts" / name).write_text((REPO / "studies" / "prompts" / name).read_text())
    for path in sorted((REPO / "studies").glob("*.yaml")):
        if path.name.startswith("stacked_digits"):  # its starting model is an export made first
            with pytest.raises(UserError, match=rf"{path.stem}\.yaml: teacher: .*does not exist"):
                load_study_config(path)
            start = "diffnas_digits_t2i" if path.name == "stacked_digits_t2i.yaml" else "diffnas_digits"
            (tmp_path / "exports" / start / "trial_0").mkdir(parents=True)
            path = tmp_path / "studies" / path.name
            path.write_text((REPO / "studies" / path.name).read_text())
            config = load_study_config(path)
            assert config.teacher == str(tmp_path / "exports" / start / "trial_0") and config.original_teacher.startswith("digits")
        if path.name.endswith(("_sd15.yaml", "_sd3.yaml")):  # its prompt files and reference images are the user's
            with pytest.raises(UserError, match=rf"{path.stem}\.yaml: prompts\.train: the prompt file .*sd_train\.txt does not exist"):
                load_study_config(path)
            continue
        config = load_study_config(path)
        assert config.objective_names
        assert config.search_space is None or config.search_space.path.endswith(".yaml")


def test_quickstart_defaults_and_paths():
    config = load_study_config(REPO / "studies" / "quickstart.yaml")
    assert config.method == "dkdm" and config.teacher == "digits"
    assert config.search_space.path == str(REPO / "search_spaces" / "digits_dkdm.yaml")
    assert config.objective_names == ["macs", "fid"] and config.directions == ["minimize", "minimize"]
    assert config.storage.startswith("sqlite:///")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "magic"}, r"method: must be one of diffnas, dipgo, dkdm"),
        ({"n_trials": 0}, r"n_trials: must be positive \(got 0\)"),
        ({"n_trials": "ten"}, r"n_trials: expected an integer \(got 'ten'\)"),
        ({"objectives": [{"name": "accuracy"}]}, r"objectives\[0\]\.name: must be one of macs, trajectory_macs, params, fid, latency"),
        ({"objectives": [{"name": "fid", "direction": "down"}]}, r"objectives\[0\]\.direction: must be one of minimize, maximize"),
        ({"objectives": ["fid", "fid"]}, r"objectives: repeats an objective"),
        ({"sampler": {"name": "cmaes"}}, r"sampler\.name: must be one of tpe, nsga2, random"),
        ({"budgets": {"train_iteration": 3}}, r"budgets\.train_iteration: unknown key"),
        ({"budgets": {"lr": "fast"}}, r"budgets\.lr: expected a number"),
        ({"device": "tpu"}, r"device: must be auto, cpu, cuda or cuda:N"),
        ({"storge": "sqlite:///x.db"}, r"storge: unknown key"),
        ({"method_options": {"pool_size": "big"}}, r"method_options\.pool_size: expected an integer"),
        ({"method_options": {"pool_eta": 2}}, r"method_options\.pool_eta: must be in \[0, 1\]"),
        ({"method_options": {"source": "web"}}, r"method_options\.source: must be one of teacher, dataset"),
        ({"method_options": {"unknown_option": 1}}, r"method_options\.unknown_option: unknown key"),
        ({"fid": {"features": "dino"}}, r"fid\.features: must be one of clip, digits, inception"),
        ({"teacher": None}, r"teacher: expected a string"),
    ],
)
def test_errors_name_file_and_key(tmp_path, change, message):
    data = yaml.safe_load((REPO / "studies" / "quickstart.yaml").read_text())
    data["search_space"] = str(REPO / "search_spaces" / "digits_dkdm.yaml")
    data.update(change)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=rf"^{path!s}: {message}"):
        load_study_config(path)


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nbudgets: {a: 1\n")
    with pytest.raises(UserError, match=r"broken\.yaml: invalid YAML at line \d+"):
        load_study_config(path)


def test_missing_required_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("method: dkdm\n")
    with pytest.raises(UserError, match=r"s\.yaml: teacher: required key is missing"):
        load_study_config(path)


def test_every_method_has_its_options_and_the_same_choices():
    from automl_diff.config.options import CONSISTENCY_LOSSES, METHOD_OPTIONS
    from automl_diff.methods import METHODS
    from automl_diff.methods.dipgo.optimise import CONSISTENCY

    assert set(METHOD_OPTIONS) == set(METHODS)
    assert all(METHODS[name].options_type is METHOD_OPTIONS[name] for name in METHODS)
    assert tuple(CONSISTENCY) == CONSISTENCY_LOSSES


def test_text_to_image_study_reads_its_prompt_sets():
    config = load_study_config(REPO / "studies" / "dipgo_digits_t2i.yaml")
    e = config.evaluation
    assert config.teacher == "digits-t2i" and e.alignment == "prompt_accuracy"
    assert len(config.train_prompts) == 60 and len(e.prompts) == 20
    assert not set(config.train_prompts) & set(e.prompts)
    assert e.fid_samples == e.images_per_prompt * len(e.prompts)
    assert e.sampling.guidance_scale == 1.5 and config.directions[2] == "maximize"
