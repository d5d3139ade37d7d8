"""PEFT's rank_pattern / alpha_pattern matching without exponential backtracking
(loractl.formats.patterns), against ``re`` itself: the same answers, and no hang."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loractl.errors import FormatError
from loractl.formats import ReadOptions, load_adapter
from loractl.formats.patterns import PatternError, _compile, matches, peft_regex

PIECES = [
    "a", "q", "_", "p", "r", "o", "j", ".", r"\d", r"\w", r"\.", "*", "+", "?", "|", "(", ")", "[a-q]",
    "[^.]", "{1,2}", "{2}", "$", "^", r"\b", r"\B", r"\A", r"\Z", "(?:", "Z", "0", r"\s", "(?i)", "(?=q)",
    r"\1", "(?s:.)", "(?i:q)", "(?m:$)",
]  # fmt: skip
NAMES = st.text(alphabet="aqprjo_.0Z\nA ", max_size=12)


@settings(max_examples=1500, deadline=None)
@given(key=st.lists(st.sampled_from(PIECES), min_size=1, max_size=8).map("".join), name=NAMES)
def test_matches_gives_re_match_answer(key: str, name: str) -> None:
    try:
        regex = re.compile(peft_regex(key))
    except re.error:
        with pytest.raises(PatternError):
            matches(key, name)
        return
    try:
        got = matches(key, name)
    except PatternError:  # refused (it would need re and could backtrack): never a wrong answer
        return
    assert got == (regex.match(name) is not None)


@pytest.mark.parametrize(
    "key, name, expected",
    [
        ("q_proj", "model.layers.0.self_attn.q_proj", True),
        ("q_proj", "model.layers.0.self_attn.xq_proj", False),
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),
        (re.escape("layers.0.self_attn.q_proj"), "model.layers.0.self_attn.q_proj", True),
        (r"layers\.\d+\.self_attn\.(q|k)_proj", "model.layers.10.self_attn.k_proj", True),
        ("q_proj", "a.q_proj\n", True),  # $ matches before a final newline, as in re
        ("q_proj", "a.q_proj\nb", False),
        (r"(?i:Q)_proj", "a.q_proj", True),
        (r"(?s:.)_proj", "a.\n_proj", True),
        ("(.*)*Z", "model.layers.0.self_attn.q_proj_and_some_more", False),
        ("(.*)*q_proj", "model.layers.0.self_attn.q_proj", True),
    ],
)
def test_known_answers(key: str, name: str, expected: bool) -> None:
    assert matches(key, name) is expected
    if _compile(key).cheap:
        assert (re.match(peft_regex(key), name) is not None) is expected


def test_pathological_patterns_finish() -> None:
    """In a subprocess with a timeout: with re these take longer than the age of the universe."""
    code = (
        "from loractl.formats.patterns import matches\n"
        "name = 'model.layers.31.self_attn.q_proj.' * 30\n"
        "for key in ['(.*)*Z', '(a|a)*Z', '.*.*.*.*.*.*.*.*.*.*Z', '(x+x+)+y', '([a-z_.0-9]+)*Z']:\n"
        "    assert not matches(key, name), key\n"
        "print('done')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr


@pytest.mark.parametrize("key", [r"((a+)+)\1Z", r"(?i:(a|aa)*Z)", r"(?=a)(.*)*Z"])
def test_patterns_that_need_re_and_could_hang_are_refused(key: str) -> None:
    with pytest.raises(PatternError, match="forever"):
        matches(key, "aaaa")


@pytest.mark.parametrize("key", [r"(q)_pr\1j|q_proj", r"(?i:Q_PROJ)", r"(?=q)q_proj"])
def test_patterns_that_need_re_but_cannot_hang_run_in_re(key: str) -> None:
    for name in ("a.q_proj", "a.k_proj", "Q_PROJ"):
        assert matches(key, name) == (re.match(peft_regex(key), name) is not None)


def test_config_with_a_pattern_that_could_hang_is_a_format_error(tmp_path) -> None:
    ad = tmp_path / "ad"
    ad.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "base_model.model.x.q_proj.lora_A.weight": torch.randn(2, 4, generator=g),
            "base_model.model.x.q_proj.lora_B.weight": torch.randn(4, 2, generator=g),
        },
        str(ad / "adapter_model.safetensors"),
    )
    (ad / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4, "rank_pattern": {"((a+)+)\\\\1Z": 2}}')
    with pytest.raises(FormatError, match=r"rank_pattern key") as e:
        load_adapter(ad, options=ReadOptions())
    assert "adapter_config.json" in e.value.message
