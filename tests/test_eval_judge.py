"""The pairwise judge against a scripted fake OpenAI-compatible server on 127.0.0.1, and a tiny local HF judge.

The fake server reads the judge prompt, finds the two outputs and, by default, prefers the one containing
"GOOD" (or the first shown when neither or both do: a position-biased judge, so the two orders disagree and
the pair is a tie). A tag in the instruction scripts a failure: "[malformed]", "[empty]", "[refuse]",
"[refusal-field]", "[flaky]" (HTTP 500 once), "[ratelimit]" (HTTP 429 with Retry-After once), "[down]"
(HTTP 503 always), "[denied]" (HTTP 401 echoing the key), "[slow]" (longer than the timeout),
"[malformed-ba]" (malformed only when B is shown first), "[echo]" (a 200 reply quoting the key in several
encodings, and a verdict), "[error200]" (HTTP 200 with an `error` object echoing the key, once), "[huge]"
(a 100 000-character reply).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import re
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from noisyft.eval.judge import (
    JudgeConfig,
    JudgeNoResultError,
    judge_answer_files,
    judge_pairwise,
    load_answers,
    pair_answers,
    parse_verdict,
    win_rates,
)

from conftest import tiny_llama, tiny_tokenizer

KEY_ENV = "NOISYFT_TEST_JUDGE_KEY"
KEY = "sk-test-CANARY7f3q-0123456789abcdef"
PLAIN_KEY = "CANARY7f3q0123456789abcdefXYZ"  # not shaped like an sk- key: only exact masking can catch it
_OUTPUTS = re.compile(r"<output_a>\n(.*)\n</output_a>\n\n<output_b>\n(.*)\n</output_b>", re.S)
_INSTRUCTION = re.compile(r"<instruction>\n(.*)\n</instruction>", re.S)


class FakeJudgeServer:
    """Chat completions on POST /v1/chat/completions, scripted by tags in the instruction."""

    def __init__(self, delay_s: float = 0.0, slow_s: float = 1.5) -> None:
        self.delay_s, self.slow_s = delay_s, slow_s
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.attempts: Counter = Counter()  # (instruction, order) -> attempts seen
        self.in_flight = self.max_in_flight = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                fake.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def sent(self, tag: str = "") -> int:
        return sum(tag in r["instruction"] for r in self.requests)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        instruction = _INSTRUCTION.search(user).group(1)
        first, second = _OUTPUTS.search(user).groups()
        order = "ab" if first.startswith("A") else "ba"
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.attempts[(instruction, order)] += 1
            attempt = self.attempts[(instruction, order)]
            self.requests.append(
                {
                    "instruction": instruction,
                    "order": order,
                    "attempt": attempt,
                    "t": time.monotonic(),
                    "auth": h.headers.get("Authorization"),
                    "body": body,
                }
            )
        try:
            time.sleep(self.delay_s)
            status, headers, payload = self.script(instruction, order, attempt, first, second, h)
            data = json.dumps(payload).encode()
            h.send_response(status)
            for name, value in {**headers, "Content-Type": "application/json"}.items():
                h.send_header(name, value)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass
        finally:
            with self.lock:
                self.in_flight -= 1

    def script(self, instruction, order, attempt, first, second, h):
        def error(status, message, headers=None):
            return status, headers or {}, {"error": {"message": message, "type": "test_error"}}

        if "[flaky]" in instruction and attempt == 1:
            return error(500, "internal error")
        if "[ratelimit]" in instruction and attempt == 1:
            return error(429, "slow down", {"retry-after-ms": "80"})
        if "[down]" in instruction:
            return error(503, "overloaded")
        if "[denied]" in instruction:
            key = h.headers.get("Authorization", "").removeprefix("Bearer ")
            return error(401, f"Incorrect API key provided: {key} (shown as {key[:10]}****{key[-4:]})")
        if "[error200]" in instruction and attempt == 1:
            key = h.headers.get("Authorization", "").removeprefix("Bearer ")
            return 200, {}, {"error": {"message": f"upstream failed for key {key}", "code": 500}}
        if "[slow]" in instruction:
            time.sleep(self.slow_s)
        reply, refusal = self.verdict(first, second), None
        if "[malformed]" in instruction or ("[malformed-ba]" in instruction and order == "ba"):
            reply = "Both outputs are fine."
        elif "[empty]" in instruction:
            reply = ""
        elif "[refuse]" in instruction:
            reply = "I'm sorry, but I can't help with that."
        elif "[refusal-field]" in instruction:
            reply, refusal = None, "I will not judge this."
        elif "[echo]" in instruction:
            auth = h.headers.get("Authorization", "")
            key = auth.removeprefix("Bearer ")
            encoded = base64.b64encode(f"user:{key}".encode()).decode()
            reply = (
                f"you sent {auth!r}, i.e. {urllib.parse.quote(key, safe='')} / Basic {encoded}; "
                f"masked: {key[:5]}****{key[-4:]}, start {key[:9]}, end {key[-9:]}"
            )
        elif "[huge]" in instruction:
            reply = "x" * 100_000
        message = {"role": "assistant", "content": reply, "refusal": refusal}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return (
            200,
            {},
            {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice]},
        )

    @staticmethod
    def verdict(first: str, second: str) -> str:
        if ("GOOD" in second) and ("GOOD" not in first):
            return "Output (b)"
        return "Output (a)"  # A GOOD, or a position-biased pick


@pytest.fixture
def server():
    srv = FakeJudgeServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def make_config(server, **kw) -> JudgeConfig:
    settings = dict(
        model="fake-judge",
        base_url=server.base_url,
        api_key_env=KEY_ENV,
        max_concurrency=4,
        max_retries=2,
        backoff_s=0.01,
        max_backoff_s=0.1,
        timeout_s=0.5,
        n_bootstrap=500,
    )
    settings.update(kw)
    return JudgeConfig(**settings)


def pairs(specs):
    """specs: (tag, who is GOOD: "a" | "b" | "") -> instructions, answers A, answers B."""
    instructions, a, b = [], [], []
    for i, (tag, good) in enumerate(specs):
        instructions.append(f"question {i} {tag}".strip())
        a.append(f"A{i} answer" + (" GOOD" if good == "a" else ""))
        b.append(f"B{i} answer" + (" GOOD" if good == "b" else ""))
    return instructions, a, b


MIXED = [
    ("", "a"),  # 0 win
    ("", "b"),  # 1 loss
    ("", ""),  # 2 tie (position bias)
    ("[malformed]", "a"),  # 3 invalid
    ("[refuse]", "a"),  # 4 invalid
    ("[flaky]", "a"),  # 5 win after one retry per order
    ("[ratelimit]", "a"),  # 6 win after honouring Retry-After
    ("[down]", "a"),  # 7 invalid after 1 + max_retries attempts per order
    ("[denied]", "a"),  # 8 invalid, never retried
    ("[slow]", "a"),  # 9 timeout after 1 + max_retries attempts per order
    ("[empty]", "a"),  # 10 invalid (malformed)
    ("[refusal-field]", "a"),  # 11 invalid (refused)
    ("[malformed-ba]", "a"),  # 12 invalid although the A-first order says A
]


# --- pure parts -----------------------------------------------------------------------------------------


def test_win_rate_formulas_worked_example_from_the_paper():
    # NEFTune human study: 88 wins, 22 ties, 140 pairs -> 88 / (140 - 22) = 74.6%
    outcomes = ["win"] * 88 + ["tie"] * 22 + ["loss"] * 30 + ["invalid"] * 5 + ["capped"] * 3
    scores = win_rates(outcomes, n_bootstrap=4000, seed=1)
    assert scores["n"] == 140  # invalid and capped pairs are not counted
    assert scores["win_rate"]["value"] == pytest.approx(88 / 118)
    assert round(100 * scores["win_rate"]["value"], 1) == 74.6
    assert scores["win_rate_ties_half"]["value"] == pytest.approx((88 + 11) / 140)
    for name in ("win_rate", "win_rate_ties_half"):
        s = scores[name]
        assert s["ci_low"] < s["value"] < s["ci_high"]
    # the bootstrap interval of a mean of 140 iid scores ~ +-1.96 standard errors
    values = [1.0] * 88 + [0.5] * 22 + [0.0] * 30
    mean = sum(values) / 140
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / 140 / 140)
    half = scores["win_rate_ties_half"]
    assert (half["ci_high"] - half["ci_low"]) / 2 == pytest.approx(1.96 * se, rel=0.12)
    # reproducible with the seed, different with another
    assert win_rates(outcomes, n_bootstrap=4000, seed=1) == scores
    assert win_rates(outcomes, n_bootstrap=4000, seed=2)["win_rate"]["ci_low"] != scores["win_rate"]["ci_low"]


def test_win_rates_degenerate_cases():
    assert win_rates(["tie", "tie"], n_bootstrap=100)["win_rate"]["value"] is None
    assert win_rates(["tie", "tie"], n_bootstrap=100)["win_rate_ties_half"]["value"] == 0.5
    empty = win_rates(["invalid"], n_bootstrap=100)
    assert empty["n"] == 0 and empty["win_rate"]["value"] is None and empty["win_rate"]["ci_low"] is None
    all_wins = win_rates(["win"] * 5, n_bootstrap=100)["win_rate"]
    assert (all_wins["value"], all_wins["ci_low"], all_wins["ci_high"]) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "reply, refusal, finish, expected",
    [
        ("Output (a)", None, "stop", ("ok", "first")),
        ("  output (B).\n", None, "stop", ("ok", "second")),
        ('"Output (a)"', None, "stop", ("ok", "first")),
        ("**Output (b)**", None, "stop", ("ok", "second")),
        ("Output (a) is better", None, "stop", ("malformed", None)),
        ("Output (a) or Output (b)", None, "stop", ("malformed", None)),
        ("Tie", None, "stop", ("malformed", None)),
        ("", None, "stop", ("malformed", None)),
        (None, None, "stop", ("malformed", None)),
        ("I\u2019m sorry, I cannot compare these.", None, "stop", ("refused", None)),
        ("As an AI, I prefer not to.", None, "stop", ("refused", None)),
        (None, "I won't.", "stop", ("refused", None)),
        ("Output (a)", None, "content_filter", ("refused", None)),
    ],
)
def test_parse_verdict_is_strict(reply, refusal, finish, expected):
    assert parse_verdict(reply, refusal=refusal, finish_reason=finish) == expected


def test_config_validation_and_no_key_field():
    with pytest.raises(ValueError, match="backend"):
        JudgeConfig(model="m", backend="anthropic")
    with pytest.raises(ValueError, match="max_concurrency"):
        JudgeConfig(model="m", max_concurrency=0)
    with pytest.raises(ValueError, match="max_requests"):
        JudgeConfig(model="m", max_requests=-1)
    with pytest.raises(ValueError, match="temperature must be 0"):
        JudgeConfig(model="m", backend="hf", temperature=0.7)
    with pytest.raises(ValueError, match="credentials"):
        JudgeConfig(model="m", base_url="https://user:pw@example.com/v1")
    with pytest.raises(ValueError, match="NAME of an environment variable") as info:
        JudgeConfig(model="m", api_key_env=KEY)  # the key pasted by mistake is not echoed
    assert "CANARY" not in str(info.value)
    assert not any(f.name == "key" or f.name == "api_key" for f in dataclasses.fields(JudgeConfig))


def test_load_answers_formats_and_errors(tmp_path):
    gen = tmp_path / "gen.jsonl"
    gen.write_text(
        json.dumps({"index": 0, "prompt": "p0", "response": "r0", "decoding": {"do_sample": False}})
        + "\n\n"
        + json.dumps({"instruction": "do x", "input": "ctx", "output": ""})
        + "\n"
    )
    records = load_answers(gen)
    assert [(r["index"], r["prompt"], r["response"], r["line"]) for r in records] == [
        (0, "p0", "r0", 1),
        (1, "do x\n\nctx", "", 3),
    ]
    array = tmp_path / "ref.json"
    array.write_text(json.dumps([{"instruction": "p0", "output": "ref"}]))
    assert load_answers(array)[0] == {"index": 0, "prompt": "p0", "response": "ref", "line": None}
    cases = {
        '{"prompt": "p"}\n': r"line 1: no 'response'",
        '{"response": "r"}\n': r"line 1: no 'prompt'",
        '{"prompt": "p", "response": "r"}\n{"prompt": 3, "response": "r"}\n': r"line 2: field 'prompt'",
        '{"prompt": "p", "response": 5}\n': r"line 1: field 'response' must be a string",
        "[1, 2]\n": r"record 0: expected a JSON object",
        '{"prompt": "p", "response": "r"}\nnot json\n': r"line 2: not valid JSON",
        "\n": "no answer records",
    }
    for k, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{k}.jsonl"
        bad.write_text(text)
        with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*" + message):
            load_answers(bad)


def test_pair_answers_names_first_mismatch():
    a = [{"prompt": p, "response": "x", "line": i + 1} for i, p in enumerate(["p0", "p1", "p2"])]
    b = [{"prompt": p, "response": "y", "line": i + 1} for i, p in enumerate(["p0 ", "q1", "q2"])]
    with pytest.raises(ValueError, match=r"prompts differ at index 1, A line 2, B line 2: 'p1' vs 'q1'"):
        pair_answers(a, b, name_a="A", name_b="B")
    with pytest.raises(ValueError, match="has 3 answers but B has 2"):
        pair_answers(a, b[:2], name_a="A", name_b="B")
    assert pair_answers(a[:1], b[:1]) == (["p0"], ["x"], ["y"])


# --- against the fake server ----------------------------------------------------------------------------


def test_mixed_replies_statuses_retries_and_files(server, key_env, tmp_path):
    instructions, a, b = pairs(MIXED)
    config = make_config(server)
    summary = judge_pairwise(
        instructions, a, b, config, cache_dir=tmp_path / "cache", output_dir=tmp_path / "out", progress=False
    )
    assert summary["counts"] == {"win": 3, "loss": 1, "tie": 1, "invalid": 8, "capped": 0}
    assert summary["n"] == 5 and summary["n_pairs"] == 13
    assert summary["win_rate"]["value"] == pytest.approx(3 / (5 - 1))
    assert summary["win_rate_ties_half"]["value"] == pytest.approx((3 + 0.5) / 5)

    rows = [json.loads(line) for line in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert len(rows) == 26 and [(r["pair"], r["order"]) for r in rows[:2]] == [(0, "ab"), (0, "ba")]
    by = {(r["pair"], r["order"]): r for r in rows}
    outcome = {r["pair"]: r["outcome"] for r in rows}
    assert [outcome[i] for i in range(13)] == ["win", "loss", "tie"] + ["invalid"] * 2 + ["win"] * 2 + [
        "invalid"
    ] * 6
    # statuses and raw replies are recorded per request
    for i, status in {3: "malformed", 4: "refused", 7: "http_error", 8: "http_error", 9: "timeout"}.items():
        assert by[(i, "ab")]["status"] == by[(i, "ba")]["status"] == status
    assert by[(3, "ab")]["reply"] == "Both outputs are fine."
    assert by[(4, "ba")]["reply"].startswith("I'm sorry")
    assert by[(10, "ab")]["status"] == "malformed" and by[(10, "ab")]["reply"] == ""
    assert by[(11, "ab")]["status"] == "refused" and by[(11, "ab")]["reply"] == "I will not judge this."
    assert by[(12, "ab")]["status"] == "ok" and by[(12, "ab")]["preferred"] == "a"
    assert by[(12, "ba")]["status"] == "malformed"  # so the pair is invalid, not a win
    assert by[(7, "ab")]["http_status"] == 503 and by[(8, "ab")]["http_status"] == 401
    # both orders asked; B shown first really puts B's answer first
    for i in (0, 1, 2):
        assert server.attempts[(instructions[i], "ab")] == server.attempts[(instructions[i], "ba")] == 1
    # retries: once for 500/429, bounded by max_retries for 503 and timeouts, never for 401
    attempts = {i: (by[(i, "ab")]["attempts"], by[(i, "ba")]["attempts"]) for i in (0, 5, 6, 7, 8, 9)}
    assert attempts == {0: (1, 1), 5: (2, 2), 6: (2, 2), 7: (3, 3), 8: (1, 1), 9: (3, 3)}
    assert server.sent("[down]") == 6 and server.sent("[denied]") == 2 and server.sent("[slow]") == 6
    # Retry-After (80 ms) was honoured, above the 10-20 ms backoff
    times = [r["t"] for r in server.requests if "[ratelimit]" in r["instruction"] and r["order"] == "ab"]
    assert times[1] - times[0] >= 0.075
    assert summary["requests"]["sent"] == len(server.requests) == 38
    assert summary["requests"]["retries"] == 2 + 2 + 4 + 4  # flaky, ratelimit, down, slow
    assert summary["requests"]["by_status"]["ok"] == 2 * 5 + 1
    # decoding settings were sent and recorded
    assert all(r["body"]["temperature"] == 0 and r["body"]["model"] == "fake-judge" for r in server.requests)
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["counts"] == summary["counts"] and on_disk["judge"]["temperature"] == 0.0
    assert on_disk["judge"]["max_retries"] == 2 and on_disk["prompt_version"] == "noisyft-pairwise-v1"


def test_cache_makes_a_rerun_free_and_retries_only_failures(server, key_env, tmp_path):
    instructions, a, b = pairs([("", "a"), ("", "b"), ("", ""), ("[malformed]", "a"), ("[down]", "a")])
    config = make_config(server, timeout_s=2.0)
    first = judge_pairwise(instructions, a, b, config, cache_dir=tmp_path / "c", progress=False)
    assert len(server.requests) == 2 * 3 + 2 + 2 * 3
    second = judge_pairwise(instructions, a, b, config, cache_dir=tmp_path / "c", progress=False)
    # replies (malformed ones included) come from the cache; only the transport failure is asked again
    assert len(server.requests) == 14 + 6 and server.sent("[down]") == 12
    assert second["requests"]["cache_hits"] == 8 and second["counts"] == first["counts"]
    # a fully cached run sends nothing, even with max_requests=0
    clean = [instructions[:4], a[:4], b[:4]]
    before = len(server.requests)
    third = judge_pairwise(
        *clean, make_config(server, max_requests=0), cache_dir=tmp_path / "c", progress=False
    )
    assert len(server.requests) == before and third["requests"]["sent"] == 0
    assert third["requests"]["cache_hits"] == 8 and third["counts"]["win"] == 1
    # without caching invalid replies the malformed pair is asked again; another judge model misses the cache
    judge_pairwise(
        *clean, make_config(server, cache_invalid_replies=False), cache_dir=tmp_path / "c", progress=False
    )
    assert len(server.requests) == before + 2
    judge_pairwise(*clean, make_config(server, model="other-judge"), cache_dir=tmp_path / "c", progress=False)
    assert len(server.requests) == before + 2 + 8


def test_max_requests_caps_sends_and_reports_capped_pairs(server, key_env, tmp_path):
    instructions, a, b = pairs([("", "a")] * 5)
    config = make_config(server, max_requests=3, max_concurrency=1)
    summary = judge_pairwise(instructions, a, b, config, cache_dir=tmp_path / "c", progress=False)
    assert len(server.requests) == 3 and summary["requests"]["sent"] == 3
    assert summary["counts"] == {"win": 1, "loss": 0, "tie": 0, "invalid": 0, "capped": 4}
    assert summary["requests"]["by_status"]["capped"] == 7 and summary["n"] == 1
    # the cap also bounds retries: 2 sends for a server that is down, however many retries are allowed
    instructions, a, b = pairs([("[down]", "a")] * 3)
    config = make_config(server, max_requests=2, max_concurrency=1, max_retries=5)
    summary = judge_pairwise(instructions, a, b, config, cache_dir=tmp_path / "c", progress=False)
    assert server.sent("[down]") == 2
    assert summary["counts"] == {"win": 0, "loss": 0, "tie": 0, "invalid": 1, "capped": 2}


def test_concurrency_is_bounded(key_env, tmp_path):
    srv = FakeJudgeServer(delay_s=0.1)
    srv.thread.start()
    try:
        instructions, a, b = pairs([("", "a")] * 8)
        summary = judge_pairwise(
            instructions, a, b, make_config(srv, max_concurrency=3), cache_dir=tmp_path / "c", progress=False
        )
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
    assert summary["counts"]["win"] == 8
    assert srv.max_in_flight == 3  # reached, never exceeded


@pytest.mark.parametrize("key", [KEY, PLAIN_KEY])
def test_api_key_never_leaks(key, server, monkeypatch, tmp_path, caplog, capsys):
    monkeypatch.setenv(KEY_ENV, key)
    caplog.set_level(logging.DEBUG)  # the SDK and httpx debug logs too
    instructions, a, b = pairs([("", "a"), ("[denied]", "a"), ("[down]", "a"), ("[malformed]", "b")])
    config = make_config(server)
    summary = judge_answer_files_from(tmp_path, instructions, a, b, config)
    # the key was used (read from the environment at call time) ...
    assert {r["auth"] for r in server.requests} == {f"Bearer {key}"}
    assert summary["counts"]["invalid"] == 3
    # ... and is nowhere else: files written, cache, logs, console, config, summary
    written = [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 2 + 4 + 2  # answer files, 4 cached replies, summary + judgments
    captured = capsys.readouterr()
    texts = [*written, caplog.text, captured.out, captured.err, repr(config), json.dumps(summary)]
    texts.append(json.dumps(dataclasses.asdict(config)))
    pieces = [key[i : i + 8] for i in range(len(key) - 7)]  # the server also echoes a masked key
    for text in texts:
        assert not [p for p in pieces if p in text]
    denied = json.loads((tmp_path / "out" / "judgments.jsonl").read_text().splitlines()[2])
    assert denied["status"] == "http_error" and "HTTP 401" in denied["error"] and "***" in denied["error"]
    # an unset variable is a clear error that names the variable
    with pytest.raises(ValueError, match="NOISYFT_UNSET_KEY"):
        judge_pairwise(
            ["q"], ["a"], ["b"], make_config(server, api_key_env="NOISYFT_UNSET_KEY"), progress=False
        )


def judge_answer_files_from(tmp_path, instructions, a, b, config):
    fa, fb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    fa.write_text(
        "".join(
            json.dumps({"index": i, "prompt": p, "response": r}) + "\n"
            for i, (p, r) in enumerate(zip(instructions, a, strict=True))
        )
    )
    fb.write_text(
        "".join(
            json.dumps({"instruction": p, "output": r}) + "\n" for p, r in zip(instructions, b, strict=True)
        )
    )
    summary = judge_answer_files(
        fa, fb, config, cache_dir=tmp_path / "cache", output_dir=tmp_path / "out", progress=True
    )
    assert summary["answers"] == {"a": str(fa), "b": str(fb)}
    return summary


# --- local HF judge -------------------------------------------------------------------------------------


def test_hf_backend_greedy_both_orders_with_controlled_outputs(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    tok.add_tokens(["Output", "(a)", "(b)"])  # generate is faked below, so the model's vocab need not grow
    hello, w5 = tok.convert_tokens_to_ids(["hello", "w5"])
    calls = []

    def fake_generate(input_ids, attention_mask, **kwargs):
        calls.append(kwargs)
        ids = input_ids[0].tolist()
        if hello in ids and w5 in ids:  # prefer the answer with "hello", wherever it is shown
            label = "(a)" if ids.index(hello) < ids.index(w5) else "(b)"
        else:
            label = "(a)"
        new = torch.tensor([tok.convert_tokens_to_ids(["Output", label, "</s>"])])  # (1, 3)
        return torch.cat([input_ids, new], dim=1)  # (1, T + 3)

    model.generate = fake_generate
    config = JudgeConfig(model="tiny-judge", backend="hf", n_bootstrap=200)
    instructions = ["w1 w2", "w3", "w4"]
    a, b = ["hello world", "w5 w6", "w7"], ["w5 w6", "hello there", "w8"]
    summary = judge_pairwise(
        instructions, a, b, config, cache_dir=tmp_path / "c", judge_model=(model, tok), progress=False
    )
    assert summary["counts"] == {"win": 1, "loss": 1, "tie": 1, "invalid": 0, "capped": 0}
    assert len(calls) == 6 and all(c["do_sample"] is False and c["max_new_tokens"] == 16 for c in calls)
    judge_pairwise(
        instructions, a, b, config, cache_dir=tmp_path / "c", judge_model=(model, tok), progress=False
    )
    assert len(calls) == 6  # cached

    # a real (random) tiny model never produces a label: all malformed, never a win
    real = tiny_llama()
    summary = judge_pairwise(
        instructions[:2],
        a[:2],
        b[:2],
        config,
        cache_dir=tmp_path / "c2",
        judge_model=(real, tiny_tokenizer()),
        progress=False,
    )
    assert summary["counts"]["invalid"] == 2 and summary["counts"]["win"] == 0
    assert summary["requests"]["by_status"]["malformed"] == 4


def test_load_answers_keeps_line_separators_inside_strings(tmp_path):
    """U+2028 may stand unescaped in a JSON string; str.splitlines() would cut the record there."""
    path = tmp_path / "a.jsonl"
    rec = {"prompt": "say it", "response": "one\u2028two"}
    path.write_text(json.dumps(rec, ensure_ascii=False) + "\n" + json.dumps(rec) + "\n", encoding="utf-8")
    records = load_answers(path)
    assert [r["response"] for r in records] == ["one\u2028two", "one\u2028two"]
    assert [r["line"] for r in records] == [1, 2]


# --- secrets in replies, HTTP 200 errors, reply size, no result -----------------------------------------


@pytest.mark.parametrize("key", [KEY, PLAIN_KEY])
def test_a_key_echoed_in_a_successful_reply_never_reaches_disk(key, server, monkeypatch, tmp_path, caplog):
    from noisyft.eval.redaction import MASK

    monkeypatch.setenv(KEY_ENV, key)
    caplog.set_level(logging.DEBUG)
    instructions, a, b = pairs([("[echo]", "a"), ("[error200]", "a"), ("", "a")])
    summary = judge_answer_files_from(tmp_path, instructions, a, b, make_config(server))
    rows = [json.loads(line) for line in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    echo = rows[0]["reply"]
    assert rows[0]["status"] == "malformed" and echo.startswith("you sent 'Bearer ***'")  # it was written
    assert "masked: ***, start ***, end ***" in echo  # whole: no visible start or end beside the mask
    # every encoding of the key is gone from every file, log line and the summary
    forms = {key, urllib.parse.quote(key, safe=""), base64.b64encode(f"user:{key}".encode()).decode()[8:-4]}
    pieces = {f[i : i + 8] for f in forms for i in range(len(f) - 7)}
    pieces |= {key[:5] + "****", "****" + key[-4:]}
    texts = [p.read_text() for p in tmp_path.rglob("*") if p.is_file()] + [caplog.text, json.dumps(summary)]
    for text in texts:
        assert not [p for p in pieces if p in text]
    assert MASK in (tmp_path / "out" / "judgments.jsonl").read_text()


def test_http_200_with_an_error_object_is_retried_not_cached(server, key_env, tmp_path):
    instructions, a, b = pairs([("[error200]", "a")])
    cache = tmp_path / "cache"
    summary = judge_pairwise(instructions, a, b, make_config(server), cache_dir=cache, progress=False)
    assert summary["counts"]["win"] == 1 and summary["requests"]["retries"] == 2  # one retry per order
    assert server.sent("[error200]") == 4
    entries = [json.loads(p.read_text()) for p in cache.rglob("*.json")]
    assert sorted(e["status"] for e in entries) == ["ok", "ok"]
    # with no retry allowed, it is a transport failure (http_error), not a malformed verdict
    summary = judge_pairwise(
        ["question [error200] again"],
        a,
        b,
        make_config(server, max_retries=0),
        cache_dir=cache,
        progress=False,
    )
    assert (
        summary["requests"]["by_status"]["http_error"] == 2
        and summary["requests"]["by_status"]["malformed"] == 0
    )
    assert len(list(cache.rglob("*.json"))) == 2  # nothing more cached


def test_replies_are_stored_capped_and_flagged(server, key_env, tmp_path):
    from noisyft.eval.judge_backends import MAX_REPLY_CHARS

    instructions, a, b = pairs([("[huge]", "a")])
    judge_pairwise(
        instructions,
        a,
        b,
        make_config(server),
        cache_dir=tmp_path / "c",
        output_dir=tmp_path / "o",
        progress=False,
    )
    rows = [json.loads(line) for line in (tmp_path / "o" / "judgments.jsonl").read_text().splitlines()]
    assert [len(r["reply"]) for r in rows] == [MAX_REPLY_CHARS] * 2 and all(
        r["reply_truncated"] for r in rows
    )
    for entry in (tmp_path / "c").rglob("*.json"):
        assert entry.stat().st_size < MAX_REPLY_CHARS + 1000


def test_no_judged_pair_raises_after_writing_the_results(server, key_env, tmp_path):
    instructions, a, b = pairs([("[down]", "a"), ("[malformed]", "a")])
    with pytest.raises(JudgeNoResultError, match=r"could not judge any of the 2 pairs") as info:
        judge_answer_files_from(tmp_path, instructions, a, b, make_config(server, max_retries=0))
    assert isinstance(info.value, ValueError) and info.value.summary["n"] == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["counts"]["invalid"] == 2
    # all capped (max_requests=0, empty cache) is no result either
    with pytest.raises(JudgeNoResultError, match="capped: 2"):
        (tmp_path / "x").mkdir()
        judge_answer_files_from(tmp_path / "x", *pairs([("", "a")]), make_config(server, max_requests=0))


def test_redaction_replaces_the_whole_key_in_any_encoding():
    from noisyft.eval.redaction import redact

    key = PLAIN_KEY
    cases = {
        f"Authorization: Bearer {key}": "Authorization: Bearer ***",
        f"k={urllib.parse.quote_plus(key)}&x=1": "k=***&x=1",
        f"prefix {key[:12]}... suffix": "prefix *** suffix",
        f"shown as {key[:4]}****{key[-3:]}.": "shown as ***.",
        f"{key[2:20]}": "***",
        "an ordinary sentence... with dots": "an ordinary sentence... with dots",
    }
    for text, expected in cases.items():
        assert redact(text, key) == expected
    for prefix in ("", "u:", "ab:"):  # base64 at each byte alignment
        encoded = base64.b64encode(f"{prefix}{key}".encode()).decode()
        masked = redact(f"Basic {encoded}", key)
        assert "***" in masked and len(masked) < len("Basic ") + 8 + 3
