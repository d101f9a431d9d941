"""The method registry: every method is declared once, and what derives from it (the inits it names,
the CLI's choices, a run's settings) follows it, PiSSA included."""

from __future__ import annotations

import pytest
from peft import LoraConfig

from oloraplus.cli import main
from oloraplus.errors import UserError
from oloraplus.method.adapters import INITS, init_for_peft_value
from oloraplus.method.registry import FAMILIES, METHODS, get_method, plus_method
from oloraplus.training.config import TrainConfig


def test_each_family_is_a_single_rate_method_and_its_plus_method():
    assert set(FAMILIES) >= {"lora", "olora", "pissa"}
    for family in FAMILIES:
        members = [m for m in METHODS.values() if m.family == family]
        assert sorted(m.takes_ratio for m in members) == [False, True], family
        single, plus = sorted(members, key=lambda m: m.takes_ratio)
        assert single.name == family and plus is plus_method(family)
        assert single.init == plus.init and plus.label == single.label + "+"
    assert get_method("pissa-plus").label == "PiSSA+"


def test_every_registered_init_is_implemented_and_known_to_peft():
    assert {m.init for m in METHODS.values()} <= set(INITS)
    for name, init in INITS.items():
        config = LoraConfig(r=4, init_lora_weights=init.peft_value)  # PEFT accepts the value we save
        assert init_for_peft_value(config.init_lora_weights) == name
    assert init_for_peft_value("loftq") is None


def test_unknown_method_names_the_choices():
    with pytest.raises(UserError) as info:
        get_method("pissa+")
    assert all(name in str(info.value) for name in METHODS)


@pytest.mark.parametrize("method", ["pissa", "pissa-plus"])
def test_a_run_of_a_registered_method_uses_its_init(method, tmp_path):
    ratio = 4.0 if METHODS[method].takes_ratio else None
    config = TrainConfig(output=str(tmp_path / "run"), method=method, ratio=ratio, lr=1e-3, weight_decay=0.01)
    adapter = config.adapter_config()
    assert adapter.init == "pissa"
    assert (adapter.ratio, adapter.lr, adapter.weight_decay) == (config.lam, 1e-3, 0.01)


def test_ratio_rules_follow_the_registry(tmp_path):
    with pytest.raises(UserError, match="--ratio"):
        TrainConfig(output=str(tmp_path / "run"), method="pissa-plus").validate()
    with pytest.raises(UserError, match="pissa-plus"):
        TrainConfig(output=str(tmp_path / "run"), method="pissa", ratio=4.0).validate()


def test_the_cli_offers_every_registered_method(tmp_path, capsys):
    assert main(["train", "--output", str(tmp_path / "run"), "--method", "no-such-method"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in METHODS), err


@pytest.mark.parametrize("recorded", [{"method": {"name": "x", "init": "corda"}}, {}])
def test_analyze_refuses_an_init_it_has_no_reference_for(tmp_path, capsys, recorded):
    """A start that analyze cannot rebuild from W (here CorDA's, which needs data) is refused instead of
    measuring a drift against the wrong one, whether the init is read from results.json or the adapter."""
    import json

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"config": {"model": "tiny", "rank": 4}, **recorded}))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8,
                                                                     "init_lora_weights": "corda"}))
    assert main(["analyze", str(run), "--output", str(tmp_path / "analysis")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "analyze supports olora, lora, pissa adapters" in err[0], err


def test_track_dynamics_reads_each_registered_init_and_refuses_others():
    from types import SimpleNamespace

    from conftest import tiny_model

    from oloraplus.analysis.dynamics import peft_init
    from oloraplus.method.adapters import INITS, OLoRAPlusConfig, apply_adapters

    for init in INITS:  # every init of the registry has a reference
        assert peft_init(apply_adapters(tiny_model("llama"), OLoRAPlusConfig(rank=4, init=init))) == init
    with pytest.raises(UserError, match="supports olora, lora, pissa adapters, not corda"):
        peft_init(SimpleNamespace(peft_config={"default": SimpleNamespace(init_lora_weights="corda")}))
    mixed = {"a": SimpleNamespace(init_lora_weights="pissa"), "b": SimpleNamespace(init_lora_weights="olora")}
    with pytest.raises(UserError, match="one start for every adapter"):
        peft_init(SimpleNamespace(peft_config=mixed))
