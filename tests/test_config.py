"""Run configuration: TOML + --set overrides, unknown keys are errors."""

from pathlib import Path

import pytest

from training.config import config_from_dict, config_to_dict, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    for path in (ROOT / "configs").glob("*.toml"):
        cfg = load_config(path)
        assert cfg.head_family and cfg.run_dir


def test_overrides_typed_and_nested():
    cfg = load_config(ROOT / "configs" / "synthetic.toml",
                      ["original.epochs=2", "original.lr=1", "split_after=layer1",
                       'head_family=[{name="x", replace=["bottleneck"]}]'])
    assert cfg.original.epochs == 2 and cfg.original.lr == 1.0
    assert isinstance(cfg.original.lr, float)
    assert cfg.split_after == "layer1"
    assert cfg.head_family[0].replace == ("bottleneck",)


@pytest.mark.parametrize("bad, message", [
    ("original.epoch=3", "unknown config key original.'epoch'"),
    ("nonsense=1", "unknown config key 'nonsense'"),
    ("original.epochs=three", "expected int"),
    ("original.augment=1", "expected true/false"),
    ('head_family=[{name="x", replace=["wavelet"]}]', "unknown block kinds"),
    ('head_cost="speed"', "head_cost must be one of"),
    ('head_family=[{name="short-1/8"}]', "names the head's files"),
    ("head_family=[{name=\"x\", blocks=-2}]", "blocks must be >= 0"),
])
def test_bad_overrides(bad, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [bad])


def test_round_trip():
    cfg = load_config(ROOT / "configs" / "tiny-imagenet-200.toml")
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_parse_override():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("name=plain text") == {"name": "plain text"}
    with pytest.raises(ValueError):
        parse_override("novalue")
