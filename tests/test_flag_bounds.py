"""Every numeric flag of train.py has declared bounds, and validate() enforces them: generated from the
TrainConfig fields themselves, so a new int or float flag without bounds fails here. For each field,
values just outside its bounds (and, for floats, inf, -inf and nan; drawn by hypothesis beyond them)
are refused in one sentence naming the flag; values on the inside edge are accepted.
"""

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora.cli import UsageError
from minilora.train.config import TrainConfig, validate

BOUND_KEYS = ("ge", "gt", "le", "lt", "choices")  # how a field declares its bounds (its metadata)
NUMERIC = [f for f in dataclasses.fields(TrainConfig) if f.type in ("int", "float", int, float)]


def is_float(f) -> bool:
    return f.type in ("float", float)


def below(f, v):
    return v - 1 if not is_float(f) else math.nextafter(v, -math.inf)


def above(f, v):
    return v + 1 if not is_float(f) else math.nextafter(v, math.inf)


def edges(f) -> tuple[list, list]:
    """(values just outside the declared bounds, values on their inside edges)."""
    m = f.metadata
    if "choices" in m:
        return [min(m["choices"]) - 1, max(m["choices"]) + 1, sum(m["choices"])], list(m["choices"])
    outside, inside = [], []
    if "ge" in m:
        outside.append(below(f, m["ge"]))
        inside.append(m["ge"])
    if "gt" in m:
        outside.append(m["gt"])
        inside.append(above(f, m["gt"]))
    if "le" in m:
        outside.append(above(f, m["le"]))
        inside.append(m["le"])
    if "lt" in m:
        outside.append(m["lt"])
        inside.append(below(f, m["lt"]))
    if is_float(f):
        outside += [math.inf, -math.inf, math.nan]
    return outside, inside


def beyond(f):
    """A strategy for values anywhere outside the bounds."""
    m, s = f.metadata, []
    num = st.floats if is_float(f) else st.integers
    for key, side in (("ge", "max"), ("gt", "max"), ("le", "min"), ("lt", "min")):
        if key in m:
            excl = key in ("ge", "le")  # the bound itself is allowed: exclude it
            kw = {f"{side}_value": m[key]}
            if is_float(f):
                kw[f"exclude_{side}"] = excl
                kw["allow_nan"] = False
            elif excl:
                kw[f"{side}_value"] = m[key] - 1 if side == "max" else m[key] + 1
            s.append(num(**kw))
    if "choices" in m:
        s.append(num().filter(lambda v: v not in m["choices"]))
    return st.one_of(s)


def base() -> TrainConfig:
    return TrainConfig(max_steps=1)  # --epochs 0 is allowed with --max-steps (the one cross-field check)


def refusal(name: str, value) -> str:
    cfg = base()
    setattr(cfg, name, value)
    with pytest.raises(UsageError) as e:
        validate(cfg)
    return str(e.value)


def assert_one_sentence_naming(msg: str, flag: str) -> None:
    assert msg.startswith(flag + " ") and msg.endswith(".") and "\n" not in msg, msg
    assert msg.count(". ") == 0, msg  # one sentence


def test_every_numeric_field_declares_bounds():
    assert len(NUMERIC) >= 20  # the walk below covers the real fields, not an empty list
    missing = [f.name for f in NUMERIC if not any(k in f.metadata for k in BOUND_KEYS)]
    assert missing == [], f"numeric flags without declared bounds (ge/gt/le/lt/choices): {missing}"


@pytest.mark.parametrize("f", NUMERIC, ids=[f.name for f in NUMERIC])
def test_just_outside_is_refused_naming_the_flag_and_the_inside_edge_is_accepted(f):
    flag = "--" + f.name.replace("_", "-")
    outside, inside = edges(f)
    assert outside and inside, f.name
    for value in outside:
        assert_one_sentence_naming(refusal(f.name, value), flag)
    for value in inside:
        cfg = base()
        setattr(cfg, f.name, value)
        validate(cfg)  # no UsageError


@pytest.mark.parametrize("f", NUMERIC, ids=[f.name for f in NUMERIC])
@given(data=st.data())
def test_drawn_values_beyond_the_bounds_are_refused(f, data):
    value = data.draw(beyond(f), label=f.name)
    assert_one_sentence_naming(refusal(f.name, value), "--" + f.name.replace("_", "-"))


def test_the_defaults_and_the_demo_pass():
    from minilora.train.config import parse_args

    validate(TrainConfig())
    validate(parse_args([]))
