"""The rest of the course world's public API: a wrong argument is named, never a raw torch/Python error."""
import pytest
import torch

from sara_edu.errors import ConfigError, DataError, PromptError


def _cases():
    from sara_edu.lessons.sara_step_by_step import rank_for_energy
    from sara_edu.lessons.weight_distributions import weight_stats
    from sara_edu.world import data, styles
    from sara_edu.world.text import TinyTextEncoder, make_prompt, tokenize

    enc = TinyTextEncoder()
    return [
        ("encode None", lambda: enc(None), PromptError, "prompts must be a string or a list of strings, got NoneType"),
        ("encode [3]", lambda: enc([3]), PromptError, r"prompts\[0\] is int 3, not a string"),
        ("encode []", lambda: enc([]), PromptError, "prompts is empty"),
        ("tokenize 3", lambda: tokenize(3), PromptError, "a prompt must be a string such as 'a digit 3', got int 3"),
        ("make_prompt 3.5", lambda: make_prompt(3.5), PromptError, "digit must be an integer 0..9, got 3.5"),
        ("make_prompt True", lambda: make_prompt(True), PromptError, "digit must be an integer 0..9, got True"),
        ("make_prompt style 5", lambda: make_prompt(3, 5), PromptError, "style must be a style name or None, got int"),
        ("dataset prompts ints", lambda: data.TensorImageDataset(torch.zeros(2, 3, 16, 16), [1, 2]), PromptError,
         r"prompts\[0\] is int 1"),
        ("dataset images list", lambda: data.TensorImageDataset([1, 2], ["a", "b"]), DataError,
         r"images must be a tensor of shape \(N, 3, H, W\).*got list"),
        ("dataset images 3-D", lambda: data.TensorImageDataset(torch.zeros(3, 16, 16), ["a"] * 3), DataError,
         r"got \(3, 16, 16\)"),
        ("limit -1", lambda: data.StyleDataset("cyberpunk", limit_per_digit=-1), ConfigError,
         "limit_per_digit must be >= 1, got -1"),
        ("limit 1.5", lambda: data.StyleDataset("cyberpunk", limit_per_digit=1.5), ConfigError,
         "limit_per_digit must be an integer, got float 1.5"),
        ("digits 3", lambda: data.StyleDataset("cyberpunk", digits=3), DataError,
         "digits must be a collection of integers 0..9"),
        ("digits [2.5]", lambda: data.StyleDataset("cyberpunk", digits=[2.5]), DataError,
         "digits must be a collection of integers 0..9"),
        ("seed 'x'", lambda: data.StyleDataset("cyberpunk", seed="x"), ConfigError,
         "seed must be an integer, got str 'x'; it seeds each image's colour jitter"),
        ("ink 2-D", lambda: styles.apply_style(torch.zeros(16, 16), "cyberpunk"), DataError,
         r"ink must be a float tensor of shape \(N, H, W\).*ink\[None\]"),
        ("ink NaN", lambda: styles.apply_style(torch.full((1, 16, 16), float("nan")), None), DataError,
         "ink contains NaN"),
        ("style 3", lambda: styles.apply_style(torch.zeros(1, 16, 16), 3), PromptError, "style must be a look name"),
        ("export list", lambda: data.export_image_folder([1, 2], "unused"), DataError,
         "export_image_folder needs a dataset such as StyleDataset"),
        ("energy 2", lambda: rank_for_energy([1.0, 0.5], 2.0), ConfigError, r"energy must be a share in \(0, 1\]"),
        ("weight_stats threshold -1", lambda: weight_stats(torch.nn.Linear(2, 2), -1), ConfigError,
         "threshold must be a positive number"),
    ]


@pytest.mark.parametrize("case", range(len(_cases())), ids=[c[0] for c in _cases()])
def test_wrong_arguments_are_named(case):
    _, call, error, msg = _cases()[case]
    with pytest.raises(error, match=msg):
        call()
