import pytest

from daytune.budget import Budget
from daytune.config import RunConfig, load_run_config
from daytune.errors import ConfigError
from daytune.units import format_duration, parse_duration


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("3m", 180),
        ("24h", 86400),
        ("90s", 90),
        ("1h30m", 5400),
        ("90", 90),
        (45, 45),
        ("1.5h", 5400),
        ("2d", 172800),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["3 minutes please", "m3", "-5", "0", "3x", True, "1h 30q"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ConfigError, match="budget"):
        parse_duration(bad)


def test_no_budget_means_none():
    assert parse_duration(None) is None and parse_duration("none") is None
    assert format_duration(None) == "∞" and format_duration(3725) == "1h02m05s"


def test_budget_stops_before_a_step_would_cross_the_deadline():
    now = [0.0]
    b = Budget(seconds=10.0, spent_before=0.0, clock=lambda: now[0])
    now[0] = 5.0  # 5 s already used
    b.record_save(0.5)  # reserve 1 s
    b.record_step(2.0)  # next step estimated at 3 s: 5 + 3 + 1 < 10
    assert not b.should_stop()
    b.record_step(3.5)  # slowest step 3.5 -> estimate 5.25: 5 + 5.25 + 1 > 10
    assert b.should_stop()


def test_budget_counts_time_from_before_a_resume():
    b = Budget(seconds=100.0, spent_before=99.5, clock=lambda: 7.0)
    assert b.should_stop() and b.remaining() == 0.5


def test_unknown_key_names_it_and_lists_valid(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(p)
    msg = str(e.value)
    assert "train.learning_rate" in msg and "lr" in msg and "micro_batch" in msg and str(p) in msg


def test_unknown_top_level_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("modle: x\n")
    with pytest.raises(ConfigError, match="unknown key 'modle'.*model"):
        load_run_config(p)


def test_type_errors_name_the_field(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  micro_batch: four\n")
    with pytest.raises(ConfigError, match="train.micro_batch: expected an integer"):
        load_run_config(p)


def test_bad_budget_and_choices(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  budget: soon\n")
    with pytest.raises(ConfigError, match="train.budget"):
        load_run_config(p)
    p.write_text("train:\n  precision: fp8\n")
    with pytest.raises(ConfigError, match="train.precision: 'fp8' is not one of"):
        load_run_config(p)


def test_invalid_yaml_names_the_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: a\ntrain: [1,\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:\d+: not valid YAML"):
        load_run_config(p)


def test_overrides_and_relative_paths(tmp_path):
    (tmp_path / "d").mkdir()
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  train: d/x.jsonl\ntrain:\n  lr: 0.1\n")
    cfg = load_run_config(p, ["train.lr=3e-4", "train.budget=30s", "train.lora.targets=[q_proj]"])
    assert cfg.train.lr == 3e-4 and cfg.train.budget == "30s" and cfg.train.lora.targets == ["q_proj"]
    assert cfg.data.train == str((tmp_path / "d" / "x.jsonl").resolve())


def test_defaults_validate():
    assert RunConfig().validate().model == "smollm2-135m"


def test_quickstart_recipe_loads():
    from conftest import EXAMPLES

    cfg = load_run_config(EXAMPLES / "quickstart.yaml")
    assert cfg.train.budget == "2m30s" and cfg.data.packing and cfg.model == "smollm2-135m"
    assert cfg.data.train is None and cfg.data.prepare.endswith("quickstart-data.yaml")


def _examples(kind: str) -> list[str]:
    """Run recipes, data recipes (those with `sources:`) or sweep files (with `space:`), in examples/."""
    import yaml

    paths = sorted(__import__("conftest").EXAMPLES.glob("*.yaml"))
    kinds = {}
    for p in paths:
        top = yaml.safe_load(p.read_text()) or {}
        kinds[p.name] = "data" if "sources" in top else "sweep" if "space" in top else "run"
    return [name for name, k in kinds.items() if k == kind]


@pytest.mark.parametrize("recipe", _examples("run"))
def test_example_recipes_validate(recipe):
    from conftest import EXAMPLES

    cfg = load_run_config(EXAMPLES / recipe)
    assert (cfg.data.train or cfg.data.prepare) and cfg.train.method


@pytest.mark.parametrize("recipe", _examples("data"))
def test_example_data_recipes_validate(recipe):
    from conftest import EXAMPLES

    from daytune.data.recipe import load_data_recipe

    assert load_data_recipe(EXAMPLES / recipe).sources


@pytest.mark.parametrize("sweep", _examples("sweep"))
def test_example_sweep_files_validate(sweep, shared_data):
    from conftest import EXAMPLES

    from daytune.sweep import load_sweep

    # fields exist, ranges are not empty, values pass the recipe
    spec, dims, cfg = load_sweep(EXAMPLES / sweep)
    assert dims and cfg.train.method and spec.test is not None


def test_interval_parsing():
    from daytune.units import parse_interval

    assert parse_interval(50, "x") == ("steps", 50.0) and parse_interval("50", "x") == ("steps", 50.0)
    assert parse_interval("10m", "x") == ("seconds", 600.0)
    with pytest.raises(ConfigError, match="train.checkpoint_every"):
        parse_interval("often", "train.checkpoint_every")


def test_packing_with_virtual_tokens_is_refused(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  packing: true\ntrain:\n  method: prefix\n")
    with pytest.raises(ConfigError, match="data.packing: method prefix"):
        load_run_config(p)


def test_one_yaml_loader_names_the_file_for_run_and_data_recipes(tmp_path):
    from daytune.data.recipe import load_data_recipe

    p = tmp_path / "d.yaml"
    p.write_text("sources: [1,\n")
    with pytest.raises(ConfigError, match=r"d\.yaml:\d+: not valid YAML"):
        load_data_recipe(p)
    p.write_text("- a\n")
    with pytest.raises(ConfigError, match=r"d\.yaml: expected a mapping \(name, sources, filters"):
        load_data_recipe(p)
    with pytest.raises(ConfigError, match=r"r\.yaml: expected a mapping of sections"):
        load_run_config(p.rename(tmp_path / "r.yaml"))
    with pytest.raises(ConfigError, match="data recipe not found"):
        load_data_recipe(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "none.yaml")


def test_set_picks_list_items_and_names_what_is_not_a_section(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lr: 0.1\n  lora:\n    targets: [q_proj, v_proj]\n")
    assert load_run_config(p, ["train.lora.targets.1=k_proj"]).train.lora.targets == ["q_proj", "k_proj"]
    with pytest.raises(ConfigError, match=r"'train\.lora\.targets\.2' is not an item of the list \(0\.\.1\)"):
        load_run_config(p, ["train.lora.targets.2=x"])
    with pytest.raises(ConfigError, match=r"--set train\.lr\.x: 'train\.lr' is not a section"):
        load_run_config(p, ["train.lr.x=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_run_config(p, ["=1"])


@pytest.mark.parametrize(
    "override,field",
    [
        ("train.lr=.nan", "train.lr"),
        ("train.lr=.inf", "train.lr"),
        ("train.epochs=.inf", "train.epochs"),
        ("train.epochs=nan", "train.epochs"),
        ("train.warmup_steps=-3", "train.warmup_steps"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("train.grad_clip=0", "train.grad_clip"),
        ("data.val_rows=-5", "data.val_rows"),
        ("data.max_rows=0", "data.max_rows"),
        ("train.threads=-1", "train.threads"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.lora.dropout=1.5", "train.lora.dropout"),
        ("train.early_stopping_patience=0", "train.early_stopping_patience"),
        ("eval.heldout_rows=0", "eval.heldout_rows"),
        ("eval.max_instances=-1", "eval.max_instances"),
        ("track.system_every=.nan", "track.system_every"),
    ],
)
def test_non_finite_and_negative_values_name_the_field(override, field):
    with pytest.raises(
        ConfigError, match=rf"command line: {field}: must|command line: {field}: expected a finite"
    ):
        load_run_config(None, [override])


def test_a_non_finite_lr_exits_2_before_training(capsys, tiny_recipe):
    from daytune.cli import main

    code = main(["--quiet", "train", str(tiny_recipe()), "--set", "train.lr=.nan"])
    err = capsys.readouterr().err
    assert code == 2 and "train.lr: expected a finite number" in err and "internal error" not in err
