import pytest
import torch

from sara_edu.errors import PromptError
from sara_edu.world.text import (
    EMBED_DIM,
    MAX_TOKENS,
    STYLES,
    VOCAB,
    TinyTextEncoder,
    make_prompt,
    tokenize,
)


def test_prompts_and_tokens():
    assert make_prompt(3) == "a digit 3"
    assert make_prompt(3, "CyberPunk") == "a digit 3, cyberpunk style"
    ids = tokenize("a digit 3, cyberpunk style")
    assert [VOCAB[i] for i in ids if i] == ["a", "digit", "3", "cyberpunk", "style"]
    assert len(ids) == MAX_TOKENS and tokenize("") == [0] * MAX_TOKENS


def test_encoder_shapes_frozen_and_deterministic():
    enc = TinyTextEncoder()
    h = enc(["a digit 1", "a digit 1, hornify style"])
    assert h.shape == (2, MAX_TOKENS, EMBED_DIM)
    assert not any(p.requires_grad for p in enc.parameters())
    assert torch.equal(TinyTextEncoder()("a digit 7"), enc("a digit 7"))
    # different digits and styles give different conditioning
    assert not torch.allclose(enc("a digit 1"), enc("a digit 2"))
    for s in STYLES:
        assert not torch.allclose(enc("a digit 1"), enc(make_prompt(1, s)))


@pytest.mark.parametrize("bad", ["a digit 12", "a cat", "a digit 3, vaporwave style"])
def test_unknown_words_are_clear_errors(bad):
    with pytest.raises(PromptError, match="outside the vocabulary"):
        tokenize(bad)


def test_bad_make_prompt():
    with pytest.raises(PromptError):
        make_prompt(11)
    with pytest.raises(PromptError, match="unknown style"):
        make_prompt(1, "gothic")
