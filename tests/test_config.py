import pytest

from lmjax.config import Config, ConfigError
from lmjax.config_parse import config_from_dict, override


def test_override_parses_by_field_type():
    cfg = override(Config(), ["model.d_model=512", "optim.lr=1e-3", "model.tie_embeddings=false",
                              "train.budget_flops=3e13", "model.n_kv_heads=none", "model.mlp=gelu"])
    assert cfg.model.d_model == 512 and isinstance(cfg.model.d_model, int)
    assert cfg.optim.lr == 1e-3
    assert cfg.model.tie_embeddings is False
    assert cfg.train.budget_flops == 3e13
    assert cfg.model.n_kv_heads is None
    assert cfg.model.mlp == "gelu"


@pytest.mark.parametrize("assignment, message", [
    ("model.width=3", "unknown config key 'model.width'"),
    ("modle.d_model=3", "unknown config key 'modle.d_model'"),
    ("model.d_model=abc", "model.d_model: cannot use 'abc'"),
    ("model.d_model=1.5", "expected an integer"),
    ("model.mlp=sigmoid", "expected one of"),
    ("model.tie_embeddings=maybe", "expected true or false"),
    ("model.d_model", "expects section.field=value"),
])
def test_override_errors_name_the_key(assignment, message):
    with pytest.raises(ConfigError, match=message):
        override(Config(), [assignment])


@pytest.mark.parametrize("assignments, message", [
    (["model.d_model=100", "model.n_heads=3"], "n_heads=3 does not divide model.d_model=100"),
    (["model.n_heads=4", "model.n_kv_heads=3"], "n_kv_heads=3 does not divide model.n_heads=4"),
    (["model.vocab_size=100"], "smaller than the bytes tokenizer's 384 ids"),
    (["model.max_seq_len=128", "data.seq_len=256"], "exceeds model.max_seq_len=128"),
    (["train.steps=10", "train.tokens=100"], "only one of train.steps, train.tokens"),
])
def test_invalid_shapes_rejected(assignments, message):
    with pytest.raises(ConfigError, match=message):
        override(Config(), assignments)


def test_round_trip_through_dict():
    cfg = override(Config(), ["model.n_kv_heads=2", "train.steps=7"])
    assert config_from_dict(cfg.to_dict()) == cfg


def test_from_dict_rejects_unknown_keys():
    d = Config().to_dict()
    d["model"]["colour"] = "red"
    with pytest.raises(ConfigError, match="model.colour"):
        config_from_dict(d)


def test_nested_moe_override_and_round_trip():
    cfg = override(Config(), ["model.moe.n_experts=8", "model.moe.top_k=1", "model.moe.dispatch=capacity"])
    assert (cfg.model.moe.n_experts, cfg.model.moe.top_k, cfg.model.moe.dispatch) == (8, 1, "capacity")
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config key 'model.moe.experts'"):
        override(Config(), ["model.moe.experts=8"])
    with pytest.raises(ConfigError, match="top_k=3 must be between 1 and model.moe.n_experts=2"):
        override(Config(), ["model.moe.n_experts=2", "model.moe.top_k=3"])
    with pytest.raises(ConfigError, match="every=3 does not divide model.n_layers=4"):
        override(Config(), ["model.moe.n_experts=4", "model.moe.every=3"])


def _literal_fields(cls, prefix=""):
    """(section class, dotted key, choices) of every Literal field under `cls`, found from the hints."""
    import dataclasses
    import typing

    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            yield from _literal_fields(hint, f"{prefix}{name}.")
        elif typing.get_origin(hint) is typing.Literal:
            yield cls, prefix + name, typing.get_args(hint)


@pytest.mark.parametrize("section, key, choices", list(_literal_fields(Config)), ids=lambda x: str(x)[:40])
def test_every_literal_field_refuses_other_values(section, key, choices):
    """Building a section directly (as experiments do) with a value its Literal does not list
    fails with one line naming the key, the value and every choice."""
    with pytest.raises(ConfigError) as error:
        section(**{key.rsplit(".", 1)[-1]: "not-a-choice"})
    message = str(error.value)
    assert message.startswith(f"{key}='not-a-choice' is not one of ") and "\n" not in message
    assert all(repr(c) in message for c in choices)
    for choice in choices:  # every listed choice passes this check (others may still ask for more settings)
        try:
            section(**{key.rsplit(".", 1)[-1]: choice})
        except ConfigError as e:
            assert "is not one of" not in str(e)
