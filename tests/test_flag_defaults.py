"""train.py's flags mean what they say: the tiny demo's defaults yield to every given flag,
abbreviations are errors, and --help shows the value a bare `python train.py` really uses.
"""

import argparse
import dataclasses
import os

import pytest
from cli_runs import ROOT
from hypothesis import given
from hypothesis import strategies as st

from minilora.cli import EXIT_INTERRUPTED, EXIT_USAGE
from minilora.train.config import DEMO_OVERRIDES, TrainConfig, build_parser, given_flags, parse_args

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def _value_text(name, value):
    return os.path.relpath(value, ROOT) if name == "eval_data" and value else str(value)


@given(st.sets(st.sampled_from(sorted(DEMO_OVERRIDES))), st.data())
def test_demo_preset_yields_to_every_given_flag_and_abbreviations_are_errors(names, data):
    """A flag given in full wins over the tiny preset; an abbreviation of it is refused, never
    silently replaced by the preset (`--epoch 7` used to train 3 epochs)."""
    values = {
        "eval_data": os.path.join(ROOT, "examples", "demo", "train.jsonl"),
        "lr": 0.5,
        "epochs": 7,
        "warmup_steps": 3,
        "eval_every": 11,
        "lora_dropout": 0.2,
        "threads": 2,
        "log_every": 4,
        "save_every": 7,
    }
    argv = []
    for name in sorted(names):
        flag = "--" + name.replace("_", "-")
        if isinstance(DEMO_OVERRIDES[name], bool):
            argv.append(flag if not DEMO_OVERRIDES[name] else "--no-" + flag[2:])
        else:
            argv += [flag, str(values[name])]
    cfg = parse_args(argv)
    assert given_flags(argv) == names
    for name in DEMO_OVERRIDES:
        want = (
            (not DEMO_OVERRIDES[name])
            if name in names and isinstance(DEMO_OVERRIDES[name], bool)
            else (values.get(name) if name in names else DEMO_OVERRIDES[name])
        )
        assert getattr(cfg, name) == want, name
    name = data.draw(st.sampled_from(sorted(set(DEMO_OVERRIDES) - {"gradient_checkpointing"})))
    flag = "--" + name.replace("_", "-")
    cut = data.draw(st.integers(len(flag) - 4, len(flag) - 1).filter(lambda n: n > 2), label="prefix")
    with pytest.raises(SystemExit) as e:
        parse_args([flag[:cut], "1"])
    assert e.value.code == EXIT_USAGE


def test_help_shows_what_a_bare_run_uses():
    """For every flag, --help shows the value `python train.py` (the tiny demo) really uses."""
    helps = {a.dest: a for a in build_parser()._actions}
    bare = parse_args([])
    text = build_parser().format_help()
    for name in FIELDS:
        action = helps[name]
        if action.help == argparse.SUPPRESS:
            continue
        used = getattr(bare, name)
        if used != action.default:
            assert f"[tiny: {_value_text(name, used)}]" in action.help, name
    assert "exit codes" in text and f"{EXIT_INTERRUPTED} interrupted" in text
