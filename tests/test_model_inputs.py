"""What the model, generate() and load_model refuse, each in one sentence naming the argument: inputs
that surfaced as an embedding's IndexError, a matmul's size mismatch, an unpacking ValueError, a
TypeError from a KV cache's torch.zeros, or a silent empty generation."""

import pytest
import torch

from minilora.models import load_model
from minilora.models.generate import generate


@pytest.fixture(scope="module")
def model():
    return load_model("tiny", quantize=None, dtype=torch.float32)[0]


def one_sentence(e) -> str:
    msg = str(e.value)
    assert msg.count(". ") == 0 and msg.endswith("."), msg
    return msg


@pytest.mark.parametrize(
    "ids, kw, said",
    [
        (torch.full((1, 3), 1024), {}, "token id 1024, outside the model's vocabulary of 1024"),
        (torch.tensor([[-1, 2]]), {}, "token id -1, outside"),
        (torch.rand(1, 3), {}, "must hold integer token ids, not torch.float32"),
        (torch.tensor([1, 2]), {}, "must be (B, T), got shape (2,)"),
        (torch.ones(1, 2, 3, dtype=torch.long), {}, "must be (B, T), got shape (1, 2, 3)"),
        ([[1, 2]], {}, "must be a (B, T) tensor of token ids, not a list"),
        (torch.ones(2, 5, dtype=torch.long), {"attention_mask": torch.ones(2, 4)}, "attention_mask has shape (2, 4)"),
        (torch.ones(2, 5, dtype=torch.long), {"position_ids": torch.ones(2, 3, dtype=torch.long)}, "position_ids"),
    ],
)
def test_forward_refuses_ids_it_cannot_read(model, ids, kw, said):
    with pytest.raises(ValueError) as e:
        model(ids, **kw)
    assert said in one_sentence(e)


def test_forward_still_takes_int32_ids_and_an_empty_batch(model):
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(model(ids.int()), model(ids))
    assert model(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, model.config.vocab_size)


@pytest.mark.parametrize(
    "prompts, kw, said",
    [
        ([[1, 2]], {"max_new_tokens": -1}, "max_new_tokens must be a whole number"),  # returned [[]] silently
        ([[1, 2]], {"max_new_tokens": 2.5}, "got 2.5"),
        ([[1, 2]], {"max_new_tokens": None}, "got None"),
        ([[1, 2]], {"temperature": float("nan")}, "temperature must be a finite number"),
        ([[1, 2]], {"temperature": -1.0}, "got -1.0"),
        (torch.tensor([[1, 2]]), {}, "not a Tensor; pass [tok.encode(text)]"),
        ([1, 2, 3], {}, "for one prompt pass [ids]"),
        ([[1, 2000]], {}, "token id 2000, which is outside the model's vocabulary of 1024"),
        ([[1, 2]], {"pad_id": 1025}, "pad_id 1025 is outside"),
        ([[1, 2.0]], {}, "must hold integer token ids"),
        ([], {}, "prompts is empty"),
        ([[1], []], {}, "every prompt needs at least one token"),
    ],
)
def test_generate_refuses_what_it_cannot_serve(model, prompts, kw, said):
    kw = {"max_new_tokens": 2, **kw}
    with pytest.raises(ValueError) as e:
        generate(model, prompts, **kw)
    assert said in one_sentence(e)


def test_generate_takes_one_eos_id_as_an_int(model):
    """eos_ids=2 was a TypeError ('int' object is not iterable); transformers takes an int there."""
    assert generate(model, [[5, 6]], 6, eos_ids=2) == generate(model, [[5, 6]], 6, eos_ids=(2,))


@pytest.mark.parametrize(
    "kw, said",
    [
        ({"dtype": torch.int32}, "dtype=torch.int32 is not a weight dtype"),
        ({"dtype": "fp8"}, "dtype='fp8' is not a weight dtype"),
        ({"device": "xyz"}, "device='xyz' is not a device"),
        pytest.param(
            {"device": "cuda"},
            "needs a CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"),
        ),
    ],
)
def test_load_model_refuses_a_dtype_or_device_in_one_sentence(kw, said):
    from minilora.models.loader import ModelLoadError

    with pytest.raises(ModelLoadError) as e:
        load_model("tiny", quantize=None, **kw)
    assert said in one_sentence(e)


def test_load_model_takes_a_dtype_by_name():
    """dtype="bfloat16" was torch's "to() received an invalid combination of arguments"."""
    m, _ = load_model("tiny", quantize=None, dtype="bfloat16")
    assert next(m.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("ids", [[0.5, 1], ["a", "b"], torch.tensor([0.0, 1.0]), torch.tensor([True, False]), 3])
def test_adapter_ids_must_be_integers(model, ids):
    """adapter_ids=[0.5, 1] ran row 0 on adapter 0 (torch.as_tensor truncates); strings said "too many
    dimensions 'str'"."""
    with pytest.raises(ValueError) as e:
        model(torch.tensor([[5, 6], [7, 8]]), adapter_ids=ids)
    assert "must be integers, one adapter index per row" in str(e.value)
