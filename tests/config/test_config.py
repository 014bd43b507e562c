"""Config files validate, typos and impossible values fail with the key named."""

import pytest
from run_kit import ROOT

from ace.config import ConfigError, config_from_dict, dump_config, load_config
from ace.config.reference import reference

CONFIGS = sorted(ROOT.joinpath("configs").glob("*.yaml"))


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert load_config(path, ["train.epochs=1"]).train.epochs == 1
    assert config_from_dict(__import__("yaml").safe_load(dump_config(cfg))) == cfg


def test_yaml_scientific_notation_is_a_float(tmp_path):
    cfg = load_config(write(tmp_path, "optim: {lr: 1e-3}\ntask: {name: toy}\n"), ["dual.lr=1e-2"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.dual.lr == 1e-2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=0.1"], "optim.lrr.*did you mean 'optim.lr'"),
        (["optim.lr=-1"], "optim.lr: must be > 0"),
        (["optim.lr=fast"], "optim.lr: expected float"),
        (["train.epochs=1.5"], "train.epochs: expected int"),
        (["constraint.samples=0"], "constraint.samples: must be > 0"),
        (["method=magic"], "method: 'magic' is not one of"),
        (["constraint.kind=both"], "constraint.kind"),
        (["data.train_size=0"], "data.train_size"),
        (["data.breaking=strong"], "data.breaking: expected float"),
        (["model.hidden=0"], "model.hidden"),
        (["task.name=nope"], "task.name: .nope. is not one of"),
        (["schema=99"], "schema: this config is for schema 99"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["train.epochs"], "not of the form key=value"),
        (
            [
                "method=scheduled",
                "constraint.tolerance.type=linear",
                "constraint.tolerance.start=0.1",
                "constraint.tolerance.end=1.0",
            ],
            "constraint.tolerance: method 'scheduled' tightens",
        ),
        (["constraint.tolerance.type=zigzag"], "constraint.tolerance: unknown schedule type"),
        (["dual.optimizer=rmsprop"], "dual.optimizer"),
    ],
)
def test_bad_config_names_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "task: {name: toy}\n"), overrides)


def test_reference_documents_every_key_and_the_site_generates_it():
    import importlib.util
    from types import SimpleNamespace

    text = reference()
    for key in ("optim.lr", "constraint.tolerance", "dual.formulation", "data.breaking", "log.every"):
        assert f"`{key}`" in text
    docs = ROOT / "docs"
    spec = importlib.util.spec_from_file_location("hooks", docs / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = SimpleNamespace(file=SimpleNamespace(src_uri="config-reference.md"))
    built = hooks.on_page_markdown((docs / "config-reference.md").read_text(), page)
    assert text in built and "<!-- generated" not in built
