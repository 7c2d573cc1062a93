"""The command line: help for every command, config files, one-line errors."""

import dataclasses
import json
from pathlib import Path

import click
import pytest
import typer.main
from typer.testing import CliRunner

import cli
import cli_support
from distilpose.training.runs import DumpRun, StudentRun, TeacherRun

runner = CliRunner()

COMMANDS = [
    "models",
    "checkpoint-info",
    "make-demo-data",
    "show-crops",
    "train-teacher",
    "dump-teacher",
    "store-info",
    "store-verify",
    "train-student",
    "eval",
    "ablate",
    "predict",
    "export",
    "demo",
    "bench",
]
VIZ = ["heatmaps", "confidence", "attention", "predictions", "curves"]


@pytest.mark.parametrize("command", COMMANDS + [f"viz {v}" for v in VIZ])
def test_every_command_has_help_with_defaults(command):
    result = runner.invoke(cli.app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "--config" in result.output


def test_config_file_sets_options_and_command_line_wins(tmp_path, monkeypatch):
    seen = {}

    def fake_make(out, num_train, num_val, seed):
        seen.update(out=out, num_train=num_train, num_val=num_val, seed=seed)
        return {"out": str(out)}

    import distilpose.data

    monkeypatch.setattr(distilpose.data, "make_demo_data", fake_make)
    config = tmp_path / "demo.toml"
    config.write_text("[make-demo-data]\nnum_train = 7\nnum-val = 3\nseed = 5\n")
    result = runner.invoke(
        cli.app, ["make-demo-data", str(tmp_path / "d"), "--config", str(config), "--seed", "9"]
    )
    assert result.exit_code == 0, result.output
    assert seen["num_train"] == 7 and seen["num_val"] == 3 and seen["seed"] == 9


def test_yaml_config(tmp_path, monkeypatch):
    pytest.importorskip("yaml")
    seen = {}
    import distilpose.data

    monkeypatch.setattr(distilpose.data, "make_demo_data", lambda out, **kw: seen.update(kw) or {})
    config = tmp_path / "c.yaml"
    config.write_text("num_train: 11\n")
    result = runner.invoke(
        cli.app, ["make-demo-data", str(tmp_path / "d"), "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    assert seen["num_train"] == 11


@pytest.mark.reliability(
    case="config file with an unknown option",
    outcome="one line naming the file and option, exit 1",
)
def test_unknown_config_key_is_one_line_error(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("epochs = 3\nbogus = 1\n")
    result = runner.invoke(
        cli.app,
        ["train-student", "--config", str(config), "--store", "s", "--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {config}: unknown option(s) bogus for 'train-student'"]


@pytest.mark.reliability(
    case="config file that is not valid TOML",
    outcome="one line naming the file, exit 1",
)
def test_config_that_is_not_toml(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("epochs = = 3\n")
    result = runner.invoke(cli.app, ["models", "--config", str(config)])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {config}: not valid TOML")


@pytest.mark.reliability(
    case="domain error inside a CLI command",
    outcome="one line 'error: ...', exit 1, no traceback",
)
def test_domain_errors_become_one_line_and_exit_1(tmp_path, monkeypatch):
    from distilpose.errors import BadAnnotationError

    def boom(*args, **kwargs):
        raise BadAnnotationError("x.json: annotation 3 'bbox' has width 0; expected a positive box")

    import distilpose.data

    monkeypatch.setattr(distilpose.data, "make_demo_data", boom)
    result = runner.invoke(cli.app, ["make-demo-data", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: x.json: annotation 3 'bbox' has width 0; expected a positive box"
    )


@pytest.mark.reliability(
    case="dump-teacher --shard out of range",
    outcome="usage error naming the option",
)
def test_bad_shard_option_names_the_option(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({}))
    result = runner.invoke(
        cli.app,
        [
            "dump-teacher",
            "--teacher",
            str(ann),
            "--ann",
            str(ann),
            "--images",
            str(tmp_path),
            "--out",
            str(tmp_path / "s"),
            "--shard",
            "3/2",
        ],
    )
    assert result.exit_code != 0
    assert "shard" in result.output.lower()


def test_missing_module_line_tells_an_extra_from_a_broken_install():
    """An optional extra names its pip install; a module of this package itself (moved under a
    running job, or a partial install) is not sent to the extras."""
    extra = cli_support.describe_error(ModuleNotFoundError("no s3fs", name="s3fs"), "dump-teacher")
    own = cli_support.describe_error(
        ModuleNotFoundError("gone", name="distilpose.evaluation.metrics"), "ablate"
    )
    assert "distilpose[remote]" in extra and "s3fs" in extra
    assert "distilpose[remote]" not in own and "reinstall" in own and "metrics" in own


# ---- a thin command line: each run default written once, in the run type (issue 26) ----------


def test_cli_module_stays_thin():
    lines = (Path(cli.__file__)).read_text().splitlines()
    assert len(lines) <= 700, f"cli.py has {len(lines)} lines; move what is not parsing out"


def _command(name: str) -> click.Command:
    group = typer.main.get_command(cli.app)
    return group.get_command(click.Context(group), name)


@pytest.mark.parametrize("command", sorted(cli_support.RUN_COMMANDS))
def test_no_option_restates_a_run_default(command):
    """Every option of a run command sets a field of its run type; where the field has a
    default, the option defaults to None (so only given options reach the run) and its help
    shows the run type's default."""
    kind, renamed = (
        cli_support.RUN_COMMANDS[command].kind,
        cli_support.RUN_COMMANDS[command].renamed,
    )
    run_fields = {f.name: f for f in dataclasses.fields(kind)}
    for param in _command(command).params:
        if param.name == "config":
            continue
        field = renamed.get(param.name, param.name)
        assert field in run_fields, f"{command} --{param.name}: no {kind.__name__} field {field}"
        run_default = run_fields[field].default
        if run_default is dataclasses.MISSING:
            continue  # a required field: nothing to restate (train-teacher's --model picks one)
        assert param.default is None, (
            f"{command} --{param.name} defaults to {param.default!r}; "
            f"{kind.__name__}.{field} (= {run_default!r}) is the one place for it"
        )
        if run_default is not None and field == param.name:  # renamed ones convert the value
            assert cli_support.default(kind, field) in param.help, (command, param.name)


def test_help_shows_the_run_types_defaults():
    """typer's rich help drops "[default: X]" as a style tag; "(default: X)" is shown."""
    result = runner.invoke(cli.app, ["train-student", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert f"(default: {StudentRun.epochs})" in result.output
    assert "(default: the paper's 500, at most a tenth of the run)" in result.output


def _parsed_run(command: str, args: list[str]):
    """The run `command args` would start (parsed by click, built as the command builds it)."""
    ctx = _command(command).make_context(command, [str(a) for a in args])
    return cli_support.RUN_COMMANDS[command].run(ctx.params)


def test_options_left_out_keep_the_run_types_defaults(tmp_path):
    ann, images = tmp_path / "a.json", tmp_path
    ann.write_text("{}")
    given = ["--ann", ann, "--images", images, "--out", tmp_path / "o"]
    assert _parsed_run("train-student", ["--store", "s", "--out", "o"]) == StudentRun(
        "s", out_dir="o"
    )
    teacher = TeacherRun("tokenpose_tiny", ann, images, tmp_path / "o")
    assert _parsed_run("train-teacher", given) == teacher
    assert _parsed_run("dump-teacher", ["--teacher", ann, *given]) == DumpRun(
        ann, ann, images, tmp_path / "o"
    )


def test_options_given_reach_the_run(tmp_path):
    from distilpose.data import MILD_RECIPE

    ann = tmp_path / "a.json"
    ann.write_text("{}")
    args = ["--teacher", ann, "--ann", ann, "--images", tmp_path, "--out", "s"]
    args += ["--raw-targets", "--shard", "1/2", "--augment", "mild", "--device", "cpu"]
    run = _parsed_run("dump-teacher", args)
    assert (run.targets_zstd, run.shard, run.recipe, run.device) == (
        False, (1, 2), MILD_RECIPE, "cpu",
    )  # fmt: skip
    args = ["--store", "s", "--out", "o", "--warmup-iters", "7", "--no-sync-bn"]
    run = _parsed_run("train-student", [*args, "--schedule", "cosine", "--input-size", "48x64"])
    assert (run.warmup_iters, run.sync_bn, run.schedule) == (7, False, "cosine")
    assert run.model_overrides == cli_support.size_overrides("48x64")
