"""Registry guards: hyper-parameter types, name clashes, which errors the CLI reports as one line."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import bnnbench
from bnnbench import registry
from bnnbench.cli import main as cli_main
from bnnbench.errors import USER_ERRORS, ConfigError, UnknownMethodError


def test_numbers_are_normalised_to_the_field_type_so_equal_configs_compare_equal():
    assert bnnbench.get_method("biper", w0=20).hparams() == bnnbench.get_method("biper", w0=20.0).hparams()
    assert isinstance(bnnbench.get_method("biper", w0=20).w0, float)
    assert bnnbench.get_method("biper", w0="10").w0 == 10.0


@pytest.mark.parametrize("hp", [{"w0": "fast"}, {"w0": [20]}, {"periodic": "maybe"}, {"periodic": 1.5}])
def test_a_value_of_the_wrong_type_is_refused_with_its_name(hp):
    (key,) = hp
    with pytest.raises(ConfigError, match=f"hyper-parameter {key}="):
        bnnbench.get_method("biper", **hp)


def test_a_plugin_cannot_replace_a_builtin_method(monkeypatch):
    registry.list_methods()  # built-ins and entry points loaded before the copy
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))

    @dataclass
    class BiPer(bnnbench.Method):  # same class name as the built-in, another module
        pass

    with pytest.raises(ConfigError, match="'biper' is already registered by bnnbench.methods.biper.BiPer"):
        bnnbench.register_method("biper")(BiPer)
    assert registry.method_class("biper").__module__ == "bnnbench.methods.biper"


def test_user_errors_are_value_errors_and_internal_errors_are_not():
    assert issubclass(ConfigError, USER_ERRORS) and issubclass(UnknownMethodError, USER_ERRORS)
    assert not issubclass(KeyError, USER_ERRORS) and not issubclass(AttributeError, USER_ERRORS)
    with pytest.raises(TypeError, match="no option depth"):  # ConfigError is also a TypeError
        bnnbench.build_model("resnet20", "biper", depth=3)


def test_cli_reports_a_user_error_in_one_line(capsys):
    assert cli_main(["run", "--method", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bnnbench: error: unknown method 'nope'; valid methods: biper")


def test_act_norm_is_refused_for_a_method_with_a_learned_threshold():
    """sign(a / s + beta) != sign(a + beta): ReActNet with act_norm would train and evaluate different nets."""
    with pytest.raises(ConfigError, match="reactnet.*--no-act-norm"):
        bnnbench.build_model("resnet20", "reactnet", act_norm=True)
    assert bnnbench.build_model("resnet20", "reactnet").spec.act_norm is False
