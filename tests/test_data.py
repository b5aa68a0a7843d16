"""Data files (alignd.data): formats, validation with file:line, skip_bad, gzip, atomic writes, splits."""

from __future__ import annotations

import gzip
import json
import pickle
from collections import Counter
from pathlib import Path

import pytest

from alignd.data import (
    ASSISTANT,
    Comparison,
    DataError,
    Demonstration,
    load_comparisons,
    load_demonstrations,
    load_prompts,
    load_texts,
    split_train_eval,
    to_hf_dataset,
    write_jsonl_atomic,
)

HH_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base-sample.jsonl.gz"


def write_lines(path: Path, lines: list, *, gz: bool = False) -> Path:
    """Lines as given (str) or JSON-encoded (anything else), one per line."""
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- round trips ---------------------------------------------------------------


def test_demonstrations_round_trip(tmp_path):
    demos = [Demonstration("Say hi.", " Hi!"), Demonstration("Ünïcode\u2028prompt", "line1\nline2 \u2603")]
    path = tmp_path / "demos.jsonl"
    assert write_jsonl_atomic(path, demos) == 2
    got, report = load_demonstrations(path)
    assert got == demos
    assert (report.loaded, report.skipped, report.problems, report.warnings) == (2, 0, [], [])
    assert report.format == "demonstrations"
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed, not left behind


def test_rankings_round_trip_and_pairs(tmp_path):
    recs = [
        Comparison("p1", ["a", "b", "c"], [2, 0, 1]),
        Comparison("p2", ["x", "y"], [1, 0]),
        Comparison("p3", [f"c{i}" for i in range(9)], list(range(8, -1, -1))),
    ]
    path = tmp_path / "rank.jsonl"
    write_jsonl_atomic(path, recs)
    got, report = load_comparisons(path)
    assert got == recs and report.format == "rankings" and report.loaded == 3
    assert recs[0].pairs() == [(2, 0), (2, 1), (0, 1)]  # c > a > b
    assert [len(r.pairs()) for r in recs] == [3, 1, 36]  # C(K, 2)
    assert recs[2].k == 9


def test_pairwise_becomes_k2(tmp_path):
    path = write_lines(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Q?", "chosen": " good", "rejected": " bad", "id": 7},  # extra fields are ignored
            {"prompt": "R?", "chosen": "yes", "rejected": "no"},
        ],
    )
    got, report = load_comparisons(path)
    assert report.format == "pairwise"
    assert got == [Comparison("Q?", [" good", " bad"], [0, 1]), Comparison("R?", ["yes", "no"], [0, 1])]


def test_hh_transcripts_split_at_last_assistant_turn(tmp_path):
    prefix = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How do I bake bread?\n\nAssistant:"
    path = write_lines(
        tmp_path / "hh.jsonl",
        [
            {"chosen": prefix + " Knead, rise, bake.", "rejected": prefix + " I can't help."},
        ],
    )
    (got,), report = load_comparisons(path)
    assert report.format == "hh"
    assert got == Comparison(prefix, [" Knead, rise, bake.", " I can't help."], [0, 1])


def test_explicit_format(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert load_comparisons(path, format="pairwise")[0] == [Comparison("p", ["a", "b"], [0, 1])]
    with pytest.raises(DataError, match=r":1: missing field 'completions'"):
        load_comparisons(path, format="rankings")
    with pytest.raises(ValueError, match="format must be"):
        load_comparisons(path, format="csv")


def test_prompts_jsonl_and_txt(tmp_path):
    j = write_lines(tmp_path / "p.jsonl", [{"prompt": "one"}, "", {"prompt": "two", "x": 1}])
    assert load_prompts(j)[0] == ["one", "two"]
    q = write_lines(tmp_path / "q.jsonl", [{"question": "why?"}])
    assert load_prompts(q, field="question")[0] == ["why?"]
    t = tmp_path / "p.txt"
    t.write_text("first prompt\n\n  \nsecond\r\nthird", encoding="utf-8")
    prompts, report = load_prompts(t)
    assert prompts == ["first prompt", "second", "third"] and report.format == "text"
    write_jsonl_atomic(tmp_path / "w.jsonl", ["a", "b"])
    assert load_prompts(tmp_path / "w.jsonl")[0] == ["a", "b"]


def test_pretraining_texts(tmp_path):
    t = tmp_path / "corpus.txt"
    t.write_text("Doc one.\nDoc two.\n", encoding="utf-8")
    assert load_texts(t)[0] == ["Doc one.", "Doc two."]
    j = write_lines(tmp_path / "corpus.jsonl", [{"text": "A document."}, {"text": "Another."}])
    assert load_texts(j)[0] == ["A document.", "Another."]


def test_gzip_read_and_write(tmp_path):
    recs = [Comparison("p", ["a", "b", "c"], [1, 2, 0])]
    path = tmp_path / "rank.jsonl.gz"
    write_jsonl_atomic(path, recs)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert load_comparisons(path)[0] == recs
    # gzip is detected by content, not by name
    odd = write_lines(tmp_path / "demos.jsonl", [{"prompt": "p", "completion": "c"}], gz=True)
    assert load_demonstrations(odd)[0] == [Demonstration("p", "c")]
    assert load_prompts(write_lines(tmp_path / "p.txt.gz", ["hello"], gz=True))[0] == ["hello"]


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl_atomic(path, [Demonstration("p", "c")])
    before = path.read_bytes()

    def records():
        yield Demonstration("q", "d")
        raise RuntimeError("labeler crashed")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, records())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_to_hf_dataset():
    ds = to_hf_dataset([Comparison("p", ["a", "b", "c"], [2, 0, 1]), Comparison("q", ["x", "y"], [0, 1])])
    assert ds.num_rows == 2 and ds.column_names == ["prompt", "completions", "ranking"]
    assert ds[0] == {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]}
    assert to_hf_dataset(["a", "b"])["prompt"] == ["a", "b"]


# --- the real HH-RLHF sample -----------------------------------------------------------


def test_hh_rlhf_sample():
    comps, report = load_comparisons(HH_SAMPLE)
    assert report.format == "hh" and report.loaded == 1000 and report.skipped == 0
    assert len(comps) == 1000
    for c in comps:
        assert c.k == 2 and c.ranking == [0, 1]
        assert c.prompt.startswith("\n\nHuman:") and c.prompt.endswith(ASSISTANT)
        assert c.prompt[: -len(ASSISTANT)].strip()
        assert "\n\nHuman:" not in c.completions[0] and "\n\nHuman:" not in c.completions[1]
        assert c.completions[0] != c.completions[1]  # the loader rejects identical pairs
    # every line splits cleanly: same prefix in both transcripts, chosen != rejected
    raw = [json.loads(line) for line in gzip.open(HH_SAMPLE, "rt", encoding="utf-8")]
    assert [c.prompt + c.completions[0] for c in comps] == [r["chosen"] for r in raw]
    assert [c.prompt + c.completions[1] for c in comps] == [r["rejected"] for r in raw]
    assert len({c.prompt for c in comps}) == 1000  # no prompt repeats in the sample
    # the data's quirk: 3 chosen replies are a single space (the preferred answer was to say nothing)
    blank = [n for n, c in enumerate(comps, start=1) if not c.completions[0].strip()]
    assert blank == [87, 517, 926]
    assert all(comps[n - 1].completions[0] == " " for n in blank)
    assert all(c.completions[1].strip() for c in comps)
    assert report.warning_count == 3
    assert [w.split(": ", 1)[0] for w in report.warnings] == [f"{HH_SAMPLE}:{n}" for n in blank]
    turns = Counter(c.prompt.count("\n\nHuman:") for c in comps)
    assert turns[1] == 300 and max(turns) == 18  # 1 to 18 human turns per prompt
    train, evals = split_train_eval(comps, 0.1, seed=0)
    assert (len(train), len(evals)) == (900, 100)


# --- bad data --------------------------------------------------------------------------

GOOD_RANK = {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1, 2]}
HH_PREFIX = "\n\nHuman: q\n\nAssistant:"

BAD_COMPARISONS = [
    # (name, bad line, expected problem) -- the bad line is line 3 of the file (after a good line and a blank line)
    ("invalid json", '{"prompt": "p", "completions": [', "invalid JSON"),
    ("not an object", "[1, 2]", "expected a JSON object, got an array"),
    ("missing prompt", {"completions": ["a", "b"], "ranking": [0, 1]}, "missing field 'prompt'"),
    ("missing ranking", {"prompt": "p", "completions": ["a", "b"]}, "missing field 'ranking'"),
    ("missing completions", {"prompt": "p", "ranking": [0, 1]}, "missing field 'completions'"),
    ("prompt not a string", {**GOOD_RANK, "prompt": 3}, "field 'prompt' must be a string, got a number"),
    ("empty prompt", {**GOOD_RANK, "prompt": "  "}, "field 'prompt' is empty"),
    ("completions not a list", {**GOOD_RANK, "completions": "abc"}, "must be an array of strings"),
    (
        "completion not a string",
        {**GOOD_RANK, "completions": ["a", None, "c"]},
        "completions[1] must be a string, got null",
    ),
    ("empty completion", {**GOOD_RANK, "completions": ["a", "", "c"]}, "completions[1] is empty"),
    ("K = 1", {"prompt": "p", "completions": ["a"], "ranking": [0]}, "K = 1 completions; a ranking needs at least 2"),
    (
        "K = 10",
        {"prompt": "p", "completions": [str(i) for i in range(10)], "ranking": list(range(10))},
        "K = 10 completions; at most 9",
    ),
    ("ranking repeats", {**GOOD_RANK, "ranking": [0, 0, 1]}, "ranking [0, 0, 1] is not a permutation of 0..2"),
    ("ranking too short", {**GOOD_RANK, "ranking": [0, 1]}, "is not a permutation"),
    ("ranking out of range", {**GOOD_RANK, "ranking": [1, 2, 3]}, "is not a permutation"),
    ("ranking 1-based", {**GOOD_RANK, "ranking": [3, 1, 2]}, "is not a permutation"),
    ("ranking of floats", {**GOOD_RANK, "ranking": [0.0, 1.0, 2.0]}, "must be an array of completion indices"),
    (
        "ranking of bools",
        {"prompt": "p", "completions": ["a", "b"], "ranking": [True, False]},
        "must be an array of completion indices",
    ),
    ("duplicate completions", {**GOOD_RANK, "completions": ["a", "b", "a"]}, "completions 0 and 2 are identical"),
    (
        "other format",
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        "line is in the pairwise format but the file is rankings (from line 1)",
    ),
]


@pytest.mark.parametrize("name,line,problem", BAD_COMPARISONS, ids=[c[0] for c in BAD_COMPARISONS])
def test_bad_ranking_line_names_file_and_line(tmp_path, name, line, problem):
    path = write_lines(tmp_path / "rank.jsonl", [GOOD_RANK, "", line, GOOD_RANK])
    with pytest.raises(DataError) as exc:
        load_comparisons(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert problem in msg, msg
    assert (exc.value.path, exc.value.line) == (str(path), 3)
    # with skip_bad the line is dropped, counted and reported
    got, report = load_comparisons(path, skip_bad=True)
    assert len(got) == 2 and report.loaded == 2 and report.skipped == 1
    assert report.problems == [msg]


def test_max_k_is_configurable(tmp_path):
    path = write_lines(tmp_path / "rank.jsonl", [GOOD_RANK])
    with pytest.raises(DataError, match=r":1: K = 3 completions; at most 2 are allowed"):
        load_comparisons(path, max_k=2)
    k12 = {"prompt": "p", "completions": [str(i) for i in range(12)], "ranking": list(range(12))}
    assert load_comparisons(write_lines(tmp_path / "k12.jsonl", [k12]), max_k=12)[0][0].k == 12


BAD_PAIRS = [
    ("missing rejected", {"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ("missing prompt", {"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ("empty chosen", {"prompt": "p", "chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
    (
        "chosen an array of strings",  # an array is a conversational reply: of message objects
        {"prompt": "p", "chosen": ["a"], "rejected": "b"},
        "chosen[0] must be a message object {'role', 'content'}, got a string",
    ),
    ("identical", {"prompt": "p", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
]


@pytest.mark.parametrize("name,line,problem", BAD_PAIRS, ids=[c[0] for c in BAD_PAIRS])
def test_bad_pairwise_line(tmp_path, name, line, problem):
    path = write_lines(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(DataError) as exc:
        load_comparisons(path)
    assert str(exc.value) == f"{path}:2: {problem}"


BAD_HH = [
    (
        "no assistant turn",
        {"chosen": "\n\nHuman: q", "rejected": HH_PREFIX + " b"},
        "'chosen' transcript has no '\\n\\nAssistant:' turn",
    ),
    (
        "ends with human",
        {"chosen": HH_PREFIX + " a", "rejected": HH_PREFIX + " b\n\nHuman: more?"},
        "'rejected' transcript ends with a Human turn",
    ),
    (
        "prefixes differ",
        {"chosen": HH_PREFIX + " a", "rejected": "\n\nHuman: Q\n\nAssistant: b"},
        "transcripts differ before their last Assistant reply (at character 9)",
    ),
    (
        "identical",
        {"chosen": HH_PREFIX + " a", "rejected": HH_PREFIX + " a"},
        "'chosen' and 'rejected' transcripts are identical",
    ),
    ("empty reply", {"chosen": HH_PREFIX, "rejected": HH_PREFIX + " b"}, "the 'chosen' reply is empty"),
    ("no prompt before", {"chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b"}, "empty prompt"),
    (
        "pairwise line",
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        "line is in the pairwise format but the file is HH-RLHF transcript",
    ),
]


@pytest.mark.parametrize("name,line,problem", BAD_HH, ids=[c[0] for c in BAD_HH])
def test_bad_hh_line(tmp_path, name, line, problem):
    path = write_lines(tmp_path / "hh.jsonl", [{"chosen": HH_PREFIX + " a", "rejected": HH_PREFIX + " b"}, line])
    with pytest.raises(DataError) as exc:
        load_comparisons(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}:2: ") and problem in msg, msg


BAD_DEMOS = [
    ("missing completion", {"prompt": "p"}, "missing field 'completion'"),
    ("empty completion", {"prompt": "p", "completion": ""}, "field 'completion' is empty"),
    ("empty prompt", {"prompt": "", "completion": "c"}, "field 'prompt' is empty"),
    ("number", {"prompt": "p", "completion": 1}, "field 'completion' must be a string, got a number"),
    ("string line", '"just a string"', "expected a JSON object, got a string"),
    ("invalid json", "{prompt: p}", "invalid JSON (Expecting property name enclosed in double quotes at column 2)"),
]


@pytest.mark.parametrize("name,line,problem", BAD_DEMOS, ids=[c[0] for c in BAD_DEMOS])
def test_bad_demonstration_line(tmp_path, name, line, problem):
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}] * 4 + [line], gz=True)
    with pytest.raises(DataError) as exc:
        load_demonstrations(path)
    assert str(exc.value) == f"{path}:5: {problem}"


def test_bad_prompt_lines(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"text": "x"}, {"prompt": ""}, {"prompt": "ok2"}])
    with pytest.raises(DataError, match=rf"^{path}:2: missing field 'prompt'$"):
        load_prompts(path)
    prompts, report = load_prompts(path, skip_bad=True)
    assert prompts == ["ok", "ok2"]
    assert report.problems == [f"{path}:2: missing field 'prompt'", f"{path}:3: field 'prompt' is empty"]


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"fine\n\xff\xfe broken\nalso fine\n")
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8"):
        load_prompts(path)
    assert load_prompts(path, skip_bad=True)[0] == ["fine", "also fine"]


def test_line_numbers_count_physical_lines_only(tmp_path):
    # U+2028 inside a JSON string is valid JSON and must not shift line numbers (str.splitlines would split there)
    path = tmp_path / "d.jsonl"
    path.write_text('\ufeff{"prompt": "a\u2028b", "completion": "c\u0085d"}\r\n\n{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:3: missing field 'completion'$"):
        load_demonstrations(path)
    got, _ = load_demonstrations(path, skip_bad=True)
    assert got == [Demonstration("a\u2028b", "c\u0085d")]  # BOM and CRLF tolerated


def test_unreadable_files(tmp_path):
    missing = tmp_path / "nope.jsonl"
    for load in (load_demonstrations, load_comparisons, load_prompts, load_texts):
        with pytest.raises(DataError, match=rf"^{missing}: cannot read file: No such file or directory$"):
            load(missing, skip_bad=True)  # skip_bad never hides an unreadable file
    with pytest.raises(DataError, match=rf"^{tmp_path}: cannot read file"):
        load_prompts(tmp_path)
    # a gzip file cut short: the line being read is named, even with skip_bad
    good = write_lines(
        tmp_path / "d.jsonl.gz", [{"prompt": f"p{i}", "completion": "c" * 200} for i in range(200)], gz=True
    )
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(DataError, match=rf"^{cut}:\d+: cannot read file"):
        load_demonstrations(cut, skip_bad=True)


def test_empty_or_all_bad_file_refuses(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{empty}: no comparisons$"):
        load_comparisons(empty)
    bad = write_lines(tmp_path / "bad.jsonl", [{"x": 1}, {"y": 2}])
    with pytest.raises(DataError, match=r"^.*bad.jsonl:1: cannot tell the comparison format"):
        load_comparisons(bad)
    with pytest.raises(
        DataError, match=rf"^{bad}: no comparisons \(2 bad line\(s\) skipped, first: {bad}:1: cannot tell"
    ):
        load_comparisons(bad, skip_bad=True)


def test_skip_bad_counts_reports_and_keeps_good_lines(tmp_path):
    lines = [
        GOOD_RANK,  # 1 ok: fixes the format
        "not json",  # 2
        {"prompt": "p", "completions": ["a"], "ranking": [0]},  # 3 K < 2
        {**GOOD_RANK, "prompt": "q"},  # 4 ok
        {**GOOD_RANK, "ranking": [2, 1, 1]},  # 5 not a permutation
        {**GOOD_RANK, "completions": ["a", " ", "c"]},  # 6 ok, with a warning
        {**GOOD_RANK, "completions": [" ", "", "c"]},  # 7 empty (its whitespace warning is dropped with it)
    ]
    path = write_lines(tmp_path / "r.jsonl", lines)
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON"):
        load_comparisons(path)
    got, report = load_comparisons(path, skip_bad=True)
    assert [c.prompt for c in got] == ["p", "q", "p"]
    assert (report.loaded, report.skipped) == (3, 4)
    assert [p.split(": ", 1)[0] for p in report.problems] == [f"{path}:{n}" for n in (2, 3, 5, 7)]
    assert report.warnings == [f"{path}:6: completions[1] is only whitespace (' ')"]
    assert report.summary() == f"{path}: loaded 3 (rankings), skipped 4 bad line(s), 1 warning(s)"


def test_data_error_is_a_value_error_and_pickles():
    err = DataError("f.jsonl", 12, "missing field 'prompt'")
    assert isinstance(err, ValueError) and str(err) == "f.jsonl:12: missing field 'prompt'"
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.path, again.line) == (str(err), "f.jsonl", 12)
    assert str(DataError("f.jsonl", None, "cannot read file: gone")) == "f.jsonl: cannot read file: gone"


# --- train / eval split ----------------------------------------------------------------


def test_split_keeps_prompts_together_and_is_deterministic():
    recs = [Comparison(f"prompt {i % 40}", [f"a{i}", f"b{i}"], [0, 1]) for i in range(200)]  # 5 comparisons per prompt
    train, evals = split_train_eval(recs, 0.25, seed=1)
    assert len(train) + len(evals) == 200
    train_p, eval_p = {r.prompt for r in train}, {r.prompt for r in evals}
    assert not train_p & eval_p and len(eval_p) == 10 and len(evals) == 50
    assert split_train_eval(recs, 0.25, seed=1) == (train, evals)
    # independent of record order; records keep their order within a side
    shuffled = recs[::-1]
    t2, e2 = split_train_eval(shuffled, 0.25, seed=1)
    assert {r.prompt for r in e2} == eval_p and e2 == [r for r in shuffled if r.prompt in eval_p]
    assert {r.prompt for r in split_train_eval(recs, 0.25, seed=2)[1]} != eval_p
    # edge cases: no eval set; at least one prompt on each side; plain strings and dicts
    assert split_train_eval(recs, 0.0, seed=1) == (recs, [])
    t, e = split_train_eval(["x", "y", "x"], 0.01, seed=0)
    assert len(set(t)) == 1 and len(set(e)) == 1 and set(t) != set(e)
    assert split_train_eval([{"prompt": "only"}], 0.5, seed=0) == ([{"prompt": "only"}], [])
    with pytest.raises(ValueError):
        split_train_eval(recs, 1.0, seed=0)
