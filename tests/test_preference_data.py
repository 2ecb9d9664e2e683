"""Preference records for `noisyft train --task dpo|kto`: every accepted form normalises to what TRL's trainers take
(checked against TRL's own ``extract_prompt`` and ``unpair_preference_dataset``), and every bad record is named by
file, record number and field, or skipped and counted with ``skip_bad_records``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from noisyft.data import BadRecordsError
from noisyft.preference_data import build_preference_dataset, load_preference_records, normalize_preference

DATA = Path(__file__).parent / "data"


def _turn(role, content):
    return {"role": role, "content": content}


def test_shipped_files_read_whole():
    for name, task, n_records, n_examples in (
        ("preference_small.jsonl", "dpo", 16, 16),
        ("preference_chat.jsonl", "dpo", 8, 8),
        ("preference_chat.jsonl", "kto", 8, 16),  # pairs unpaired: two examples each
        ("kto_small.jsonl", "kto", 8, 6 + 2 * 2),
    ):
        ds, report = build_preference_dataset(DATA / name, task=task)
        assert (report.n_records, report.n_bad, len(ds)) == (n_records, 0, n_examples), name
        assert report.n_examples == n_examples


def test_implicit_prompt_is_trl_extract_prompt():
    from trl import extract_prompt

    chosen = [_turn("user", "a"), _turn("assistant", "b"), _turn("user", "c"), _turn("assistant", "d")]
    rejected = [*chosen[:3], _turn("assistant", "e")]
    record, kind, conversational = normalize_preference({"chosen": chosen, "rejected": rejected}, "dpo")
    assert (kind, conversational) == ("paired", True)
    assert record == extract_prompt({"chosen": chosen, "rejected": rejected})
    assert record["prompt"] == chosen[:3] and record["chosen"] == [_turn("assistant", "d")]


def test_string_replies_to_a_conversational_prompt_are_assistant_turns():
    record, _, conversational = normalize_preference(
        {"messages": [_turn("system", "s"), _turn("user", "q")], "chosen": "yes", "rejected": "no"}, "dpo"
    )
    assert conversational
    assert record == {
        "prompt": [_turn("system", "s"), _turn("user", "q")],
        "chosen": [_turn("assistant", "yes")],
        "rejected": [_turn("assistant", "no")],
    }


def test_kto_unpairs_pairs_as_trl_does(tmp_path):
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    rows = [json.loads(line) for line in (DATA / "preference_small.jsonl").read_text().splitlines()]
    ds, _ = build_preference_dataset(DATA / "preference_small.jsonl", task="kto")
    expected = unpair_preference_dataset(Dataset.from_list(rows))
    assert ds.to_list() == expected.select_columns(ds.column_names).to_list()
    assert sum(ds["label"]) == len(rows)  # chosen -> True, rejected -> False


def test_kto_keeps_unpaired_records_first_then_the_unpaired_pairs():
    ds, _ = build_preference_dataset(DATA / "kto_small.jsonl", task="kto")
    assert ds["label"][:6] == [True, False, True, False, True, False]
    assert ds["completion"][6:] == [" w1 w2", " w3 w4", " w2 w1", " w4 w3"]
    assert ds["label"][6:] == [True, True, False, False]


# task, record, field, words in the problem
BAD = {
    "missing chosen": ("dpo", {"prompt": "p", "rejected": "r"}, "chosen", "missing required field"),
    "empty rejected": ("dpo", {"prompt": "p", "chosen": "c", "rejected": "  "}, "rejected", "empty response"),
    "empty prompt": ("dpo", {"prompt": "", "chosen": "c", "rejected": "r"}, "prompt", "empty prompt"),
    "prompt a number": (
        "dpo",
        {"prompt": 3, "chosen": "c", "rejected": "r"},
        "prompt",
        "expected a string or a list",
    ),
    "chosen a number": ("dpo", {"prompt": "p", "chosen": 1, "rejected": "r"}, "chosen", "expected a string"),
    "list reply to a text prompt": (
        "dpo",
        {"prompt": "p", "chosen": [_turn("assistant", "c")], "rejected": "r"},
        "chosen",
        "expected a string",
    ),
    "unknown role": (
        "dpo",
        {"prompt": [_turn("human", "p")], "chosen": "c", "rejected": "r"},
        "prompt[0].role",
        "unknown role 'human'",
    ),
    "prompt ends with a reply": (
        "dpo",
        {"prompt": [_turn("user", "p"), _turn("assistant", "a")], "chosen": "c", "rejected": "r"},
        "prompt[1].role",
        "must end with a user turn",
    ),
    "user turn in a reply": (
        "dpo",
        {"prompt": [_turn("user", "p")], "chosen": [_turn("user", "c")], "rejected": "r"},
        "chosen[0].role",
        "assistant turns only",
    ),
    "message without content": (
        "dpo",
        {"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"},
        "prompt[0].content",
        "missing required field",
    ),
    "chosen equals rejected": (
        "dpo",
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        "chosen",
        "the same",
    ),
    "implicit prompt as text": (
        "dpo",
        {"chosen": "a b", "rejected": "a c"},
        "prompt",
        "missing required field",
    ),
    "implicit prompt with nothing shared": (
        "dpo",
        {
            "chosen": [_turn("user", "a"), _turn("assistant", "b")],
            "rejected": [_turn("user", "x"), _turn("assistant", "b")],
        },
        "chosen",
        "share no opening user turn",
    ),
    "unpaired record for dpo": (
        "dpo",
        {"prompt": "p", "completion": "c", "label": True},
        "<record>",
        "--task kto",
    ),
    "label a string": (
        "kto",
        {"prompt": "p", "completion": "c", "label": "yes"},
        "label",
        "expected true or false",
    ),
    "label a number": (
        "kto",
        {"prompt": "p", "completion": "c", "label": 1},
        "label",
        "expected true or false",
    ),
    "kto without completion": ("kto", {"prompt": "p", "label": True}, "completion", "missing required field"),
    "sft record": ("dpo", {"instruction": "i", "output": "o"}, "<record>", "not a preference record"),
    "not an object": ("kto", ["p", "c"], "<record>", "not a JSON object"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_record_names_file_record_and_field(tmp_path, name):
    task, record, field, words = BAD[name]
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(BadRecordsError) as err:
        load_preference_records(path, task=task)
    line = str(err.value).splitlines()[1]
    assert line.startswith(f"  - {path}: record 2 (line 2): field '{field}': "), line
    assert words in line, line


def test_plain_and_conversational_records_do_not_mix(tmp_path):
    path = tmp_path / "mixed.json"
    conv = {"prompt": [_turn("user", "p")], "chosen": "c", "rejected": "r"}
    path.write_text(json.dumps([{"prompt": "p", "chosen": "c", "rejected": "r"}, conv, conv]))
    with pytest.raises(
        BadRecordsError, match=r"record 2: field '<record>': a conversational record among plain"
    ):
        load_preference_records(path, task="dpo")
    records, report = load_preference_records(path, task="dpo", skip_bad_records=True)
    assert len(records) == 1 and report.n_bad == 2 and report.bad_by_kind == {"mixed formats": 2}


def test_skip_bad_records_counts_and_reports_each_kind(tmp_path):
    path = tmp_path / "prefs.jsonl"
    lines = (DATA / "preference_small.jsonl").read_text().splitlines()
    bad = [
        "{not json",
        json.dumps({"prompt": "p", "chosen": "c"}),
        json.dumps({"prompt": "p", "chosen": "c", "rejected": "c"}),
    ]
    path.write_text("\n".join(lines[:4] + bad + lines[4:]) + "\n")
    with pytest.raises(BadRecordsError, match="3 bad record"):
        load_preference_records(path, task="dpo")
    records, report = load_preference_records(path, task="dpo", skip_bad_records=True)
    assert len(records) == 16 and report.n_records == 19 and report.n_bad == 3
    assert report.bad_by_kind == {"invalid JSON": 1, "missing field": 1, "identical pair": 1}
    assert "record 6 (line 6): field 'rejected': missing required field" in report.bad_examples[1]


def test_limit_counts_good_records(tmp_path):
    records, report = load_preference_records(DATA / "preference_small.jsonl", task="dpo", limit=5)
    assert len(records) == 5 and report.n_records == 5


def test_token_counts_of_the_trainers_tokenized_set():
    from datasets import Dataset

    from noisyft.data import DataReport
    from noisyft.preference_data import count_tokens

    tokenized = Dataset.from_dict(
        {"prompt_ids": [[1, 2], [1, 2, 3]], "chosen_ids": [[4], [4, 5, 6]], "rejected_ids": [[7, 8], [9]]}
    )
    report = DataReport(source="s", format="", template="")
    count_tokens(report, tokenized, max_length=5, n_before=3)  # TRL dropped one example
    # sequences: 3, 4 | 6 -> 5 (truncated), 4: tokens 3 + 4 + 5 + 4; reply tokens 1 + 2 + 2 + 1
    assert (report.n_tokens, report.n_response_tokens, report.n_truncated) == (16, 6, 1)
    assert (report.n_examples, report.n_no_response_after_truncation) == (2, 1)
