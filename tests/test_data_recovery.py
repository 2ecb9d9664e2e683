"""No record lost under skip_bad_records: broken JSON array elements, invalid UTF-8, arrays in .jsonl files."""

from __future__ import annotations

import json

import pytest

from noisyft.data import BadRecordsError, DataSourceError, load_conversations


def record(i: int) -> dict:
    return {"instruction": f"question {i}", "input": "", "output": f"answer {i}"}


def array_with_broken(n: int, broken: int, breakage: str) -> str:
    """A pretty-printed array of `n` Alpaca records; element `broken` (1-based) spoiled by `breakage`."""
    parts = []
    for i in range(1, n + 1):
        text = json.dumps(record(i), indent=1)
        if i == broken:
            text = {
                "trailing comma": text[:-2] + ",\n}",  # {"output": "...",}
                "missing quote": text.replace('"answer', "answer", 1),
                "bare word": text.replace('""', "nothing", 1),
            }[breakage]
        parts.append(text)
    return "[\n" + ",\n".join(parts) + "\n]\n"


@pytest.mark.parametrize("breakage", ["trailing comma", "missing quote", "bare word"])
def test_one_broken_element_loses_exactly_one_record(tmp_path, breakage):
    path = tmp_path / "data.json"
    path.write_text(array_with_broken(100, 50, breakage), encoding="utf-8")
    convs, report = load_conversations(path, skip_bad_records=True)
    assert (report.n_records, report.n_bad, len(convs)) == (100, 1, 99)
    assert report.bad_by_kind == {"invalid JSON": 1}
    answers = [c[1]["content"] for c in convs]
    assert answers == [f"answer {i}" for i in range(1, 101) if i != 50]  # the 50 records after it are kept
    line = 1 + 49 * 5 + 1  # "[" then 5 lines per record: element 50 opens on line 247
    assert report.bad_examples[0].startswith(
        f"{path}: record 50 (line {line}): field '<record>': invalid JSON"
    )
    with pytest.raises(BadRecordsError, match=r"(?s)1 bad record\(s\) out of 100 .*record 50 \(line 247\)"):
        load_conversations(path)


def test_stray_and_trailing_commas_are_counted_elements(tmp_path):
    path = tmp_path / "commas.json"
    a, b = json.dumps(record(1)), json.dumps(record(2))
    path.write_text(f"[{a},, {b},]", encoding="utf-8")
    convs, report = load_conversations(path, skip_bad_records=True)
    assert len(convs) == 2 and report.n_records == 4 and report.n_bad == 2
    assert "stray ','" in report.bad_examples[0] and "trailing ','" in report.bad_examples[1]


def test_an_unbalanced_bracket_mid_file_stops_with_the_position(tmp_path):
    path = tmp_path / "unbalanced.json"
    items = [json.dumps(record(i)) for i in range(4)]
    items[1] = items[1].replace("}", "", 1)  # never closed: no element boundary can be found after it
    path.write_text("[\n" + ",\n".join(items) + "\n]\n", encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"unbalanced.*\(line 3, column 1, element 2\)") as info:
        load_conversations(path, skip_bad_records=True)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_scan_json_array_spans_and_strings_with_brackets():
    from noisyft._io import JsonArrayStructureError, scan_json_array

    text = '[{"a": "x\\",}]{"}, {"b": 1,}, 3 {"c": 2}]'
    elements = list(scan_json_array(text))
    assert [(e.index, e.value) for e in elements] == [(1, {"a": 'x",}]{'}), (2, None), (3, 3), (4, None)]
    assert [e.error is None for e in elements] == [True, False, True, False]
    assert text[elements[0].start : elements[0].end] == '{"a": "x\\",}]{"}'
    with pytest.raises(JsonArrayStructureError, match="extra data"):
        list(scan_json_array("[1] 2"))


def test_invalid_utf8_in_jsonl_is_a_skippable_bad_record_with_line_and_offset(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(record(i)).encode() for i in range(4)]
    lines[2] = lines[2].replace(b"answer", b"ans\xffwer")
    path.write_bytes(b"\n".join(lines) + b"\n")
    offset = len(lines[0]) + len(lines[1]) + 2 + lines[2].index(b"\xff")
    with pytest.raises(BadRecordsError, match=rf"record 3 \(line 3\).*invalid UTF-8.*byte offset {offset}"):
        load_conversations(path)
    convs, report = load_conversations(path, skip_bad_records=True)
    assert len(convs) == 3 and report.bad_by_kind == {"invalid UTF-8": 1} and report.n_records == 4


def test_invalid_utf8_in_a_json_array_spoils_one_element(tmp_path):
    path = tmp_path / "data.json"
    text = json.dumps([record(i) for i in range(3)], indent=1).encode()
    bad = text.index(b"answer 1")
    path.write_bytes(text[:bad] + b"\xc3\x28" + text[bad:])
    convs, report = load_conversations(path, skip_bad_records=True)
    assert len(convs) == 2 and report.bad_by_kind == {"invalid UTF-8": 1}
    assert "record 2 (line 7)" in report.bad_examples[0] and f"byte offset {bad}" in report.bad_examples[0]


@pytest.mark.parametrize("indent", [None, 1])
def test_a_json_array_in_a_jsonl_file_gets_a_rename_hint(tmp_path, indent):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps([record(i) for i in range(3)], indent=indent) + "\n", encoding="utf-8")
    with pytest.raises(
        DataSourceError, match=r"data\.jsonl: this looks like a JSON array.*rename it to \.json"
    ):
        load_conversations(path, skip_bad_records=True)
