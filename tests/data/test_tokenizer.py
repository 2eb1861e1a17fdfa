"""Prompt encoding: the tokenizer's BOS in front, once, as training rows start."""

from __future__ import annotations


def test_encode_prompt_puts_bos_first_once() -> None:
    from recurrent_depth.data.tokenizer import char_tokenizer, encode_prompt

    tok = char_tokenizer("0123456789+=")
    plain = tok("12+3=", add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, "12+3=") == [tok.bos_token_id, *plain]
    assert encode_prompt(tok, "<bos>12+3=") == [tok.bos_token_id, *plain]  # not twice
    assert encode_prompt(tok, "12+3=", add_bos=False) == plain


def test_generate_cli_encodes_prompts_with_bos_and_left_padding() -> None:
    import argparse

    from recurrent_depth.cli.generate import _encode
    from recurrent_depth.data.tokenizer import char_tokenizer

    tok = char_tokenizer("abc")
    args = argparse.Namespace(prompt_ids=None, prompt=["ab", "abc"], no_bos=False)
    ids, mask = _encode(args, tok)
    bos, pad = tok.bos_token_id, tok.pad_token_id
    a, b, c = tok("abc", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == [[pad, bos, a, b], [bos, a, b, c]]
    assert mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    args.no_bos = True
    assert _encode(args, tok)[0].tolist() == [[pad, a, b], [a, b, c]]
