"""Property tests of the dataset readers on generated rows of every schema: wrong types, null, NaN / inf /
huge numbers, empty and non-ASCII text, nested junk, ragged lengths. A row is either tokenized into a
well-formed result (finite float64 scores, non-empty ids, every response accounted for) or refused with a
one-line DataError, never with another exception.

Deterministic: ``derandomize=True`` and a fixed number of examples (FUZZ_READERS_EXAMPLES raises it for a
longer local run; the examples are still derived from the test, not from a random seed)."""

import json
import math
import os

import pytest

pytest.importorskip("hypothesis")
datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from training import data as D  # noqa: E402
from training import embedded  # noqa: E402

N = int(os.environ.get("FUZZ_READERS_EXAMPLES", "250"))
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=N, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FILES = settings(FUZZ, max_examples=max(4, N // 20))

TOK = embedded.build_char_tokenizer()
CHAT_TOK = embedded.build_char_tokenizer()
CHAT_TOK.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
# Row skips decided before any response is looked at.
EARLY_SKIPS = {"scores_responses_length_mismatch", "empty_prompt", "prompt_unknown_tokens"}


# ------------------------------------------------------------------------------------------- strategies
def weighted(*pairs):
    """``(weight, strategy)`` pairs: draw from a strategy picked in proportion to its weight."""
    return st.sampled_from([s for w, s in pairs for _ in range(w)]).flatmap(lambda s: s)


# Mostly text in the character tokenizer's vocabulary and finite scores, so that rows get kept too; else
# non-ASCII (unknown to that tokenizer), whitespace-only and empty text, NaN / inf / huge numbers, "N/A".
vocab_text = st.text(st.sampled_from(list("abcxyz019<>+= ")), min_size=1, max_size=8)
odd_text = st.one_of(st.text(st.sampled_from(list("aé漢Ω \t\n")), max_size=4), st.sampled_from(["", "   ", "<unk>"]),
                     st.text(max_size=5), st.builds(str.__add__, vocab_text, st.sampled_from(["é", "漢", "Ω"])))
text = weighted((4, vocab_text), (1, odd_text))
number = st.one_of(st.floats(), st.integers(-(2**70), 2**70), st.sampled_from([1e300, -1e300, 5e-324, -0.0]))
score = weighted((6, st.floats(-1e6, 1e6) | st.integers(-100, 100)), (1, number),
                 (1, st.one_of(st.none(), st.booleans(), st.sampled_from(["N/A", "7.5", "1e400", "nan", "", "inf"]))))
junk = st.recursive(st.one_of(st.none(), st.booleans(), number, st.text(max_size=6)),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)
opt_text = weighted((6, text), (1, st.none()))
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": opt_text})
messages = st.lists(message, max_size=4)


@st.composite
def responses_and_scores(draw, keys):
    """Equal lengths most of the time, ragged otherwise."""
    n = draw(st.integers(0, 5))
    m = draw(st.sampled_from([n, n, n, max(0, n - 1), n + 1]))
    return {keys[0]: draw(st.lists(opt_text, min_size=n, max_size=n)),
            keys[1]: draw(st.lists(score, min_size=m, max_size=m))}


completion = st.fixed_dictionaries({
    "response": opt_text, "overall_score": score, "fine-grained_score": score,
    "annotations": st.dictionaries(st.sampled_from(["helpfulness", "honesty"]),
                                   st.fixed_dictionaries({"Rating": score}), max_size=2)})
prompt = weighted((3, text), (1, messages))
# Rows of the right types, with odd values (None, NaN, "N/A", empty or non-ASCII text, ragged lengths).
WELL_TYPED = {
    "responses": st.builds(lambda p, rs: {"prompt": p, **rs}, prompt, responses_and_scores(("responses", "scores"))),
    "armorm": st.builds(lambda p, rs: {"prompt": p, **rs}, prompt,
                        responses_and_scores(("all_generated_responses", "all_rm_scores"))),
    "ultrafeedback": st.fixed_dictionaries({"instruction": prompt, "completions": st.lists(completion, max_size=4)}),
    "binarized": st.fixed_dictionaries({"prompt": prompt, "chosen": messages, "rejected": messages,
                                        "score_chosen": score, "score_rejected": score}),
}


@st.composite
def corrupted(draw, rows):
    """A well-typed row with one field, list item or item field replaced by junk, or a field left out."""
    row = dict(draw(rows))
    key = draw(st.sampled_from(sorted(row)))
    value = row[key]
    how = draw(st.sampled_from(["field", "item", "missing"]))
    if how == "missing":
        del row[key]
    elif how == "item" and isinstance(value, list) and value:
        value = row[key] = list(value)
        i = draw(st.integers(0, len(value) - 1))
        if isinstance(value[i], dict):
            value[i] = {**value[i], draw(st.sampled_from(sorted(value[i]))): draw(junk)}
        else:
            value[i] = draw(junk)
    else:
        row[key] = draw(junk)
    return row


ROWS = {fmt: weighted((2, rows), (1, corrupted(rows))) for fmt, rows in WELL_TYPED.items()}
options = st.fixed_dictionaries({
    "max_length": st.integers(2, 24), "max_prompt_length": st.integers(1, 12), "min_responses": st.sampled_from([1, 2]),
    "skip_ties": st.booleans(), "min_kept_fraction": st.sampled_from([0.0, 0.5, 1.0]),
    "score_field": st.sampled_from(["overall_score", "fine-grained_score"])})


# ---------------------------------------------------------------------------------------------- checks
def check_row(row, fmt, tokenizer, opts):
    """Tokenize one row; assert the result is well formed, or that it was refused with a one-line DataError."""
    opts = {**opts, "max_prompt_length": min(opts["max_prompt_length"], opts["max_length"])}
    try:
        prompt, responses, scores = D.normalize_row(row, fmt, score_field=opts["score_field"])
    except D.DataError as e:
        assert "\n" not in str(e) and str(e).startswith("field '"), str(e)
        with pytest.raises(D.DataError):
            D.tokenize_row(row, tokenizer, fmt=fmt, **opts)
        return None
    assert isinstance(prompt, (str, list)) and all(isinstance(r, str) for r in responses)
    assert scores is None or len(scores) == len(responses)
    assert all(s is None or (type(s) is float and math.isfinite(s)) for s in scores or [])
    try:
        out = D.tokenize_row(row, tokenizer, fmt=fmt, **opts)
    except D.DataError as e:  # only a chat template may still refuse a well-typed prompt
        assert "\n" not in str(e) and str(e).startswith("the tokenizer's chat template rejects"), str(e)
        return None
    kept, skip = out["response_ids"], out["skip"]
    assert len(out["scores"]) == len(kept) and 0 <= out["truncated"] <= len(kept)
    if skip in EARLY_SKIPS:
        assert not kept and not out["dropped"]
        return out
    # Every response is either kept or dropped with a reason.
    assert len(kept) + len(out["dropped"]) == len(responses) and all(out["dropped"])
    assert 1 <= len(out["prompt_ids"]) <= opts["max_prompt_length"]
    unk = D.unknown_token_id(tokenizer)
    for ids in kept:
        assert ids and all(type(t) is int for t in ids) and unk not in ids
        assert len(out["prompt_ids"]) + len(ids) <= opts["max_length"]
    assert len({tuple(ids) for ids in kept}) == len(kept)  # never two equal texts in one row
    assert all(type(s) is float and math.isfinite(s) for s in out["scores"])
    if skip == "":
        assert len(kept) >= opts["min_responses"]
        batch = D.collate([out], pad_id=tokenizer.pad_token_id)
        assert batch["scores"].dtype == torch.float64 and torch.isfinite(batch["scores"]).all()
    return out


@pytest.mark.parametrize("fmt", D.FORMATS)
@FUZZ
@given(data=st.data(), opts=options)
def test_rows_are_tokenized_or_refused_with_a_data_error(fmt, data, opts):
    row = data.draw(ROWS[fmt], label="row")
    check_row(row, fmt, TOK, opts)


@FUZZ
@given(row=ROWS["binarized"], opts=options)
def test_chat_template_prompts(row, opts):
    check_row(row, "binarized", CHAT_TOK, opts)


def test_the_strategies_reach_every_outcome():
    """The generated rows are not all refused: kept rows, and each skip reason below, come up."""
    seen = set()

    @settings(FUZZ, max_examples=300)
    @given(fmt=st.sampled_from(D.FORMATS), data=st.data(), opts=options)
    def collect(fmt, data, opts):
        out = check_row(data.draw(ROWS[fmt]), fmt, TOK, opts)
        seen.add("DataError" if out is None else out["skip"] or "kept")
        seen.update(out["dropped"] if out else [])

    collect()
    assert {"DataError", "kept", "scores_responses_length_mismatch", "empty_prompt", "prompt_unknown_tokens",
            "fewer_than_2_responses", "nan_or_missing_score", "empty_response", "unknown_tokens", "mostly_truncated",
            "identical_texts_different_scores"} <= seen, seen


# ----------------------------------------------------------------------------------------- whole files
def to_json_line(row) -> str:
    return json.dumps(row, allow_nan=True)


@pytest.mark.parametrize("fmt", D.FORMATS)
@FILES
@given(data=st.data())
def test_files_load_and_prepare_or_refuse_with_a_data_error(tmp_path_factory, fmt, data):
    rows = data.draw(st.lists(ROWS[fmt], min_size=1, max_size=6), label="rows")
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_text("".join(to_json_line(r) + "\n" for r in rows))
    try:
        raw = D.load_raw_dataset(str(path))
        ds, counts = D.prepare_dataset(raw, TOK, fmt=fmt, max_length=16, max_prompt_length=8, log=None,
                                       source="data.jsonl")
    except D.DataError as e:
        assert "\n" not in str(e) and str(e).startswith((str(path), "data.jsonl")), str(e)
        return
    row_skips = sum(v for k, v in counts.items() if k.startswith("row:"))
    assert counts["rows"] == len(rows) == counts["kept"] + row_skips and len(ds) == counts["kept"]
    if len(ds):
        batch = D.collate([ds[i] for i in range(len(ds))], pad_id=TOK.pad_token_id)
        assert batch["scores"].dtype == torch.float64 and torch.isfinite(batch["scores"][batch["response_mask"]]).all()


@pytest.mark.parametrize("lines, message", [
    ([{"prompt": "ab", "responses": ["x", "y"], "scores": [1, 2]}, "{\"prompt\": \"ab\", \"responses\": [}"],
     "data.jsonl line 2: invalid JSON"),
    ([{"prompt": "ab", "responses": ["x", "y"], "scores": [1, 2]},
      {"prompt": ["ab"], "responses": ["x"], "scores": [1]}],
     "data.jsonl row 1, field 'prompt': expected a list of {role, content} messages, got str 'ab' at position 0"),
    ([{"instruction": "ab", "completions": [{"response": "x", "overall_score": 1}]},
      {"instruction": "ab", "completions": {"response": "x"}}],
     "data.jsonl row 1, field 'completions': expected a list of objects, got dict"),
])
def test_file_examples(tmp_path, monkeypatch, lines, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("".join((x if isinstance(x, str) else to_json_line(x)) + "\n" for x in lines))
    with pytest.raises(D.DataError) as e:
        D.prepare_dataset(D.load_raw_dataset("data.jsonl"), TOK, max_length=16, max_prompt_length=8, log=None,
                          source="data.jsonl")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
