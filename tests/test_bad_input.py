"""Every malformed input a user can give: exit status 2, one line on stderr that names the file,
the key and the value, no traceback, and the storage left exactly as it was.

Each case builds its bad input in a temporary folder beside an SQLite storage that already holds a
study with two completed trials; the test runs the command line in this process (stderr captured
at the file-descriptor level, log records included) and compares the storage's bytes, its
modification time and the folder's files before and after.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml

from automl_diff.cli import main
from automl_diff.records import StudyAttr, TrialAttr
from tests.conftest import write_study


@dataclass
class Env:
    """The bad input's surroundings: a tiny teacher, a search space, a storage with a study."""

    tmp: Path
    teacher: Path
    space: Path
    db: Path

    @property
    def storage(self) -> str:
        return f"sqlite:///{self.db}"

    def study(self, *, teacher: str | Path | None = None, search_space: str | Path | None = None, **overrides) -> Path:
        overrides.setdefault("storage", self.storage)
        return write_study(self.tmp, teacher or self.teacher, search_space or self.space, **overrides)

    def text(self, name: str, content: str) -> Path:
        path = self.tmp / name
        path.write_text(content)
        return path

    def space_file(self, data: dict) -> Path:
        return self.text("bad_space.yaml", yaml.safe_dump(data))

    def teacher_elsewhere(self) -> Path:
        folder = self.tmp / "other_teacher"
        shutil.copytree(self.teacher, folder)
        return folder

    def teacher_copy(self, *, remove: str) -> Path:
        folder = self.tmp / "exported"
        shutil.copytree(self.teacher, folder)
        (folder / remove).unlink()
        return folder


def _make_env(tmp_path: Path, teacher: Path, space: Path) -> Env:
    db = tmp_path / "study.db"
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="tiny", directions=["minimize", "minimize"])
    study.set_metric_names(["macs", "fid"])
    study.set_user_attr(StudyAttr.OBJECTIVES, ["macs", "fid"])
    study.set_user_attr(StudyAttr.METHOD, "dkdm")
    study.set_user_attr(StudyAttr.TEACHER, str(teacher))
    study.set_user_attr(StudyAttr.SCHEDULER_CONFIG, {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000})
    weights = tmp_path / "runs" / "tiny" / "trial_0" / "unet"
    weights.mkdir(parents=True)
    shutil.copy(teacher / "unet" / "config.json", weights / "config.json")  # the safetensors file is missing
    distribution = optuna.distributions.CategoricalDistribution([4, 8])
    for i, (macs, fid) in enumerate([(1e6, 30.0), (2e6, 20.0)]):
        study.add_trial(
            optuna.trial.create_trial(
                values=[macs, fid],
                params={"down.0.channels": [4, 8][i]},
                distributions={"down.0.channels": distribution},
                user_attrs={
                    TrialAttr.MACS: macs,
                    TrialAttr.FID: fid,
                    TrialAttr.PARAMS: 1000,
                    TrialAttr.LATENCY: 0.01,
                    TrialAttr.WEIGHTS: str(weights),
                },
            )
        )
    return Env(tmp_path, teacher, space, db)


def _schedule_for_digits(env: Env) -> Path:
    from automl_diff.gating import Schedule
    from automl_diff.models.loading import load_unet
    from automl_diff.zoo.digits import DIGITS_DIR

    path = env.tmp / "schedule.json"
    Schedule.full(load_unet(DIGITS_DIR, weights=False), 4).save(path)
    return path


# (id, argv builder, substrings the one line must contain)
CASES: list[tuple[str, Callable[[Env], list[str]], Callable[[Env], list[str]]]] = [
    (
        "yaml syntax",
        lambda e: ["run", str(e.text("s.yaml", "name: x\nbudgets: {lr: 1\n"))],
        lambda e: [f"{e.tmp}/s.yaml", "invalid YAML at line 3"],
    ),
    (
        "top level not a mapping",
        lambda e: ["run", str(e.text("s.yaml", "- method\n- dkdm\n"))],
        lambda e: [f"{e.tmp}/s.yaml", "expected a mapping", "got list"],
    ),
    (
        "unknown key",
        lambda e: ["run", str(e.study(storge="sqlite:///x.db"))],
        lambda e: ["study.yaml", "storge: unknown key", "'sqlite:///x.db'"],
    ),
    ("wrong type", lambda e: ["run", str(e.study(n_trials="ten"))], lambda e: ["study.yaml", "n_trials: expected an integer", "'ten'"]),
    (
        "unknown method",
        lambda e: ["run", str(e.study(method="magic"))],
        lambda e: ["study.yaml", "method: must be one of diffnas, dipgo, dkdm", "'magic'"],
    ),
    (
        "negative budget",
        lambda e: ["run", str(e.study(budgets={"batch_size": -1}))],
        lambda e: ["study.yaml", "budgets.batch_size: must be positive", "-1"],
    ),
    (
        "wrong type in execution",
        lambda e: ["run", str(e.study(execution={"heartbeat": "often"}))],
        lambda e: ["study.yaml", "execution.heartbeat: expected an integer", "'often'"],
    ),
    (
        "unknown method option",
        lambda e: ["run", str(e.study(method_options={"pool_sise": 8}))],
        lambda e: ["study.yaml", "method_options.pool_sise: unknown key", "8"],
    ),
    (
        "unknown objective",
        lambda e: ["run", str(e.study(objectives=["macs", "accuracy"]))],
        lambda e: ["study.yaml", "objectives[1].name: must be one of", "'accuracy'"],
    ),
    (
        "bad sampler option",
        lambda e: ["run", str(e.study(sampler={"name": "random", "options": {"bogus": 1}}))],
        lambda e: ["study.yaml", "sampler.options", "bogus"],
    ),
    ("device missing", lambda e: ["run", str(e.study(device="cuda:99"))], lambda e: ["study.yaml", "device:", "'cuda:99'"]),
    (
        "missing teacher path",
        lambda e: ["run", str(e.study(teacher="./no/such/teacher"))],
        lambda e: ["study.yaml", "teacher:", "no/such/teacher", "does not exist"],
    ),
    (
        "teacher folder without weights",
        lambda e: ["run", str(e.study(teacher=str(e.teacher_copy(remove="unet/diffusion_pytorch_model.safetensors"))))],
        lambda e: ["study.yaml", "teacher:", f"{e.tmp}/exported/unet", "diffusion_pytorch_model.safetensors is missing"],
    ),
    (
        "teacher folder without scheduler",
        lambda e: ["run", str(e.study(teacher=str(e.teacher_copy(remove="scheduler/scheduler_config.json"))))],
        lambda e: ["study.yaml", "teacher:", f"{e.tmp}/exported", "scheduler/scheduler_config.json is missing"],
    ),
    (
        "search space missing",
        lambda e: ["run", str(e.study(search_space=str(e.tmp / "nope.yaml")))],
        lambda e: ["study.yaml", "search_space:", f"{e.tmp}/nope.yaml", "does not exist"],
    ),
    (
        "search space yaml syntax",
        lambda e: ["run", str(e.study(search_space=str(e.text("sp.yaml", "blocks: [down.0\n"))))],
        lambda e: [f"{e.tmp}/sp.yaml", "invalid YAML"],
    ),
    (
        "unknown block",
        lambda e: ["run", str(e.study(search_space=str(e.space_file({"blocks": {"down.7": {"channels": [8]}}}))))],
        lambda e: ["bad_space.yaml", "blocks.down.7: unknown block", "down.0, down.1, mid, up.0, up.1"],
    ),
    (
        "channels not divisible by norm groups",
        lambda e: ["run", str(e.study(search_space=str(e.space_file({"blocks": {"down.0": {"channels": [4, 6]}}}))))],
        lambda e: ["bad_space.yaml", "blocks.down.0.channels: 6 is not divisible by norm_num_groups=4"],
    ),
    (
        "unknown key in a block",
        lambda e: ["run", str(e.study(search_space=str(e.space_file({"blocks": {"down.0": {"chanels": [4]}}}))))],
        lambda e: ["bad_space.yaml", "blocks.down.0.chanels: unknown key", "[4]"],
    ),
    (
        "wrong type in a block",
        lambda e: ["run", str(e.study(search_space=str(e.space_file({"blocks": {"down.0": {"channels": ["wide"]}}}))))],
        lambda e: ["bad_space.yaml", "blocks.down.0.channels[0]: expected an integer", "'wide'"],
    ),
    (
        "fixed key that does not exist",
        lambda e: [
            "run",
            str(e.study(search_space=str(e.space_file({"fixed": {"norm_groups": 8}, "blocks": {"down.0": {"channels": [4]}}})))),
        ],
        lambda e: ["bad_space.yaml", "fixed.norm_groups", "not a UNet2DModel config key"],
    ),
    (
        "objectives of another study",
        lambda e: ["run", str(e.study(objectives=["macs"]))],
        lambda e: ["study.yaml", "objectives: study 'tiny'", "optimises macs, fid"],
    ),
    (
        "teacher of another study",
        lambda e: ["run", str(e.study(teacher=e.teacher_elsewhere()))],
        lambda e: ["study.yaml", "teacher: study 'tiny'", f"compresses '{e.teacher}', not '{e.tmp}/other_teacher'", "another --study-name"],
    ),
    (
        "unreachable storage",
        lambda e: ["run", str(e.study()), "--storage", "postgresql://automl:hunter2@127.0.0.1:1/studies"],
        lambda e: ["cannot open storage 'postgresql://automl:***@127.0.0.1:1/studies'"],
    ),
    (
        "storage folder missing",
        lambda e: ["run", str(e.study(storage=f"sqlite:///{e.tmp}/no/dir/s.db"))],
        lambda e: [f"sqlite:///{e.tmp}/no/dir/s.db", "does not exist"],
    ),
    (
        "storage url malformed",
        lambda e: ["status", "--storage", "postgres+nodriver://x/y"],
        lambda e: ["cannot open storage 'postgres+nodriver://x/y'"],
    ),
    ("n-trials not positive", lambda e: ["run", str(e.study()), "--n-trials", "0"], lambda e: ["--n-trials", "must be positive (got 0)"]),
    (
        "address without ray",
        lambda e: ["run", str(e.study()), "--address", "10.0.0.1:6379"],
        lambda e: ["--address 10.0.0.1:6379", "--backend ray"],
    ),
    (
        "unknown study",
        lambda e: ["status", "--storage", e.storage, "--study-name", "nope"],
        lambda e: [e.storage, "no study 'nope'", "tiny"],
    ),
    (
        "unknown trial",
        lambda e: ["export", "--storage", e.storage, "--trial", "99", "--out", str(e.tmp / "out")],
        lambda e: ["study 'tiny'", "no trial 99"],
    ),
    (
        "trial weights with a file missing",
        lambda e: ["export", "--storage", e.storage, "--trial", "0", "--out", str(e.tmp / "out")],
        lambda e: [f"{e.tmp}/runs/tiny/trial_0/unet", "diffusion_pytorch_model.safetensors is missing"],
    ),
    (
        "exported folder without its unet config",
        lambda e: ["profile", "--model", str(e.teacher_copy(remove="unet/config.json"))],
        lambda e: [f"{e.tmp}/exported", "no config.json, unet/config.json or transformer/config.json"],
    ),
    (
        "schedule for another model",
        lambda e: ["profile", "--model", str(e.teacher), "--schedule", str(_schedule_for_digits(e))],
        lambda e: [f"{e.tmp}/schedule.json"],
    ),
    (
        "schedule not json",
        lambda e: ["profile", "--model", "digits", "--schedule", str(e.text("schedule.json", "{gates: "))],
        lambda e: [f"{e.tmp}/schedule.json", "not valid JSON"],
    ),
    (
        "pareto csv into a missing folder",
        lambda e: ["pareto", "--storage", e.storage, "--csv", str(e.tmp / "no" / "front.csv")],
        lambda e: ["--csv", f"{e.tmp}/no", "does not exist"],
    ),
    (
        "trials of a missing database",
        lambda e: ["trials", "--storage", f"sqlite:///{e.tmp}/missing.db"],
        lambda e: [f"{e.tmp}/missing.db", "does not exist"],
    ),
    (
        "report into a missing folder",
        lambda e: ["report", "--storage", e.storage, "--out", str(e.tmp / "no" / "report.html")],
        lambda e: ["--out", f"{e.tmp}/no", "does not exist"],
    ),
    (
        "dashboard of an unknown study",
        lambda e: ["dashboard", "--storage", e.storage, "--study-name", "nope"],
        lambda e: [e.storage, "no study 'nope'"],
    ),
]


def _snapshot(env: Env) -> tuple[str, int, list[str]]:
    files = sorted(str(p.relative_to(env.tmp)) for p in env.tmp.rglob("*"))
    return hashlib.sha256(env.db.read_bytes()).hexdigest(), env.db.stat().st_mtime_ns, files


@pytest.fixture
def log_to_stderr():
    """Log records reach stderr as with the real command line (pytest holds the root logger)."""
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield
    root.removeHandler(handler)
    root.setLevel(level)


def test_every_subcommand_has_a_bad_input_case(tmp_path, tiny_teacher_dir, tiny_space):
    """A subcommand added without a case here fails this test."""
    import argparse

    from automl_diff.cli import build_parser

    commands = set()
    for i, (_, argv, _) in enumerate(CASES):  # each case builds its inputs in a folder of its own
        (tmp_path / str(i)).mkdir()
        commands.add(argv(_make_env(tmp_path / str(i), tiny_teacher_dir, tiny_space))[0])
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert commands == set(sub.choices) and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("argv", "expected"), [pytest.param(c[1], c[2], id=c[0]) for c in CASES])
def test_bad_input_exits_2_with_one_line_and_leaves_the_storage(
    argv, expected, tmp_path, tiny_teacher_dir, tiny_space, capfd, log_to_stderr
):
    env = _make_env(tmp_path, tiny_teacher_dir, tiny_space)
    args = argv(env)
    before = _snapshot(env)
    trials_before = [(t.number, t.state, t.values, t.user_attrs) for t in optuna.load_study(study_name="tiny", storage=env.storage).trials]
    capfd.readouterr()
    code = main(args)
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and out == ""
    for part in expected(env):
        assert part in lines[0], (part, lines[0])
    assert _snapshot(env) == before
    after = [(t.number, t.state, t.values, t.user_attrs) for t in optuna.load_study(study_name="tiny", storage=env.storage).trials]
    assert after == trials_before


def test_secrets_never_reach_the_output(tmp_path, tiny_teacher_dir, tiny_space, capfd, log_to_stderr):
    env = _make_env(tmp_path, tiny_teacher_dir, tiny_space)
    for argv in (
        ["status", "--storage", "postgresql://automl:s3cret-pw@127.0.0.1:1/db"],
        ["run", str(env.study()), "--storage", "postgresql+psycopg2://automl:s3cret-pw@127.0.0.1:1/db?sslmode=disable"],
    ):
        assert main(argv) == 2
        out, err = capfd.readouterr()
        assert "s3cret-pw" not in out + err and "automl:***@" in err


def test_mask_url_hides_every_password():
    from automl_diff.runners import mask_url

    assert mask_url("postgresql://user:pw@host:5432/db") == "postgresql://user:***@host:5432/db"
    assert mask_url("postgresql+psycopg2://u:p%40ss:word@h/db") == "postgresql+psycopg2://u:***@h/db"
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert mask_url("sqlite:///a:b@c.db") == "sqlite:///a:b@c.db"
    assert (
        mask_url("connect failed for postgresql://u:pw@h/db and postgresql://v:xx@g/e")
        == "connect failed for postgresql://u:***@h/db and postgresql://v:***@g/e"
    )
    data = json.dumps({"url": mask_url("postgresql://u:pw@h/db?password=pw2")})
    assert "pw2" not in data
