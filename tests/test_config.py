import json

import pytest

from nps.config import apply_overrides, config_from_dict, config_to_dict
from nps.errors import ConfigError
from nps.experiments.correlation import CorrelationConfig
from nps.experiments.synthetic import SyntheticConfig


def test_overrides_parse_by_field_type():
    config = apply_overrides(
        SyntheticConfig(),
        [
            "train.steps=7",
            "train.learning_rate=3e-4",
            "np_btl.encoder.stochastic=true",
            "np_btl.encoder.aggregation=sum",
            "eval.context_sizes=0,2",
            "models=np_btl",
        ],
    )
    assert config.train.steps == 7 and config.train.learning_rate == 3e-4
    assert config.np_btl.encoder.stochastic is True and config.np_btl.encoder.aggregation == "sum"
    assert config.eval.context_sizes == (0, 2) and config.models == ("np_btl",)
    assert SyntheticConfig().train.steps == 1000  # defaults untouched


def test_round_trip_through_json():
    for config in (apply_overrides(SyntheticConfig(), ["np_btl.encoder.latent_dim=3"]), CorrelationConfig()):
        restored = config_from_dict(type(config), json.loads(json.dumps(config_to_dict(config))))
        assert restored == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config field 'train.stepz'"),
        ("train.steps=many", "expected a number"),
        ("np_btl.encoder.stochastic=maybe", "expected true or false"),
        ("train=3", "is a group of fields"),
        ("steps", "must look like field.path=value"),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(SyntheticConfig(), [override])


def test_unknown_field_in_a_saved_config_is_an_error():
    with pytest.raises(ConfigError, match="unknown config field train.bogus"):
        config_from_dict(SyntheticConfig, {"train": {"bogus": 1}})
