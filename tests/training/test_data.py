"""Dataset readers on small local files of each schema (written here, no network), skip counting, chat
templates, prompt masking, batching and the data order that resume and multi-process runs rely on."""

import json
import math
import time

import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

from training import data as D  # noqa: E402
from training import embedded  # noqa: E402

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return embedded.build_char_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    t = embedded.build_char_tokenizer()
    t.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<assistant>{% endif %}")
    return t


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def write_parquet(path, rows):
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def prepare(path, tokenizer, **kw):
    logs = []
    raw = D.load_raw_dataset(path)
    kw.setdefault("max_length", 64)
    kw.setdefault("max_prompt_length", 32)
    ds, counts = D.prepare_dataset(raw, tokenizer, log=logs.append, **kw)
    return ds, counts, logs


def text(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


# ------------------------------------------------------------------------------------------- UltraFeedback
def uf_completion(response, overall, ratings=None, fine=None):
    ratings = ratings or {"helpfulness": "4", "honesty": "5"}
    return {"response": response, "overall_score": overall, "fine-grained_score": fine,
            "annotations": {k: {"Rating": v, "Rationale": "r"} for k, v in ratings.items()}}


def ultrafeedback_rows():
    return [
        # kept, K = 4
        {"instruction": "abc", "completions": [uf_completion("one", 7.0), uf_completion("two", 5.5),
                                               uf_completion("three", 3.0), uf_completion("four", 9.0)]},
        # a missing score and an empty response are dropped; 2 responses remain: kept, K = 2
        {"instruction": "def", "completions": [uf_completion("a", None), uf_completion("", 8.0),
                                               uf_completion("b", 6.0), uf_completion("c", 2.0)]},
        # one response: skipped
        {"instruction": "ghi", "completions": [uf_completion("only", 5.0)]},
        # every score tied: skipped (no preference to learn)
        {"instruction": "jkl", "completions": [uf_completion("x", 6.0), uf_completion("y", 6.0),
                                               uf_completion("z", 6.0)]},
        # empty instruction: skipped
        {"instruction": "", "completions": [uf_completion("p", 1.0), uf_completion("q", 2.0)]},
    ]


def test_ultrafeedback_overall_score(tmp_path, tok):
    path = write_jsonl(tmp_path / "uf.jsonl", ultrafeedback_rows())
    ds, counts, logs = prepare(path, tok)
    assert D.detect_format(D.load_raw_dataset(path).column_names) == "ultrafeedback"
    assert counts == {"rows": 5, "kept": 2, "response:nan_or_missing_score": 1, "response:empty_response": 1,
                      "row:fewer_than_2_responses": 1, "row:all_scores_tied": 1, "row:empty_prompt": 1,
                      "truncated_responses": 0}
    assert ds["scores"] == [[7.0, 5.5, 3.0, 9.0], [6.0, 2.0]]
    assert [text(tok, r[0]) for r in ds["response_ids"]] == ["one<eos>", "b<eos>"]
    # The skip counts are printed before training.
    assert "5 rows, 2 kept" in logs[0] and "row:all_scores_tied=1" in logs[0]
    assert "response:nan_or_missing_score=1" in logs[0]


def test_ultrafeedback_fine_grained_with_na_ratings(tmp_path, tok):
    rows = [{"instruction": "abc", "completions": [
        uf_completion("r1", 9.0, fine=4.5),
        # no stored fine-grained score: the mean of the ratings that are not "N/A" (4 and 2 -> 3.0)
        uf_completion("r2", 8.0, ratings={"helpfulness": "4", "honesty": "N/A", "truthfulness": "2"}),
        # every rating "N/A": no score at all, dropped
        uf_completion("r3", 7.0, ratings={"helpfulness": "N/A", "honesty": "N/A"}),
    ]}]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    ds, counts, _ = prepare(path, tok, score_field="fine-grained_score")
    assert ds["scores"] == [[4.5, 3.0]]
    assert counts["response:nan_or_missing_score"] == 1 and counts["kept"] == 1


# ------------------------------------------------------------------------------------------------- ArmoRM
def armorm_rows():
    def msgs(p, r):
        return [{"role": "user", "content": p}, {"role": "assistant", "content": r}]

    return [
        {"prompt": "abc", "all_generated_responses": ["r1", "r2", "r3", "r4", "r5"],
         "all_rm_scores": [0.1, 0.5, -0.2, 0.3, 0.0], "chosen": msgs("abc", "r2"), "rejected": msgs("abc", "r3")},
        # NaN scores are dropped, 3 responses stay
        {"prompt": "def", "all_generated_responses": ["s1", "s2", "s3", "s4", "s5"],
         "all_rm_scores": [float("nan"), 0.2, float("nan"), 0.4, 0.1], "chosen": msgs("def", "s4"),
         "rejected": msgs("def", "s5")},
        # a prompt longer than max_length leaves no room for any response
        {"prompt": "x" * 80, "all_generated_responses": ["t1", "t2"], "all_rm_scores": [0.3, 0.1],
         "chosen": msgs("x", "t1"), "rejected": msgs("x", "t2")},
    ]


def test_armorm_parquet_nan_scores_and_truncation(tmp_path, tok):
    path = write_parquet(tmp_path / "armorm.parquet", armorm_rows())
    assert D.detect_format(D.load_raw_dataset(path).column_names) == "armorm"
    # max_prompt_length == max_length: the left-truncated prompt fills the whole sequence.
    ds, counts, _ = prepare(path, tok, max_length=32, max_prompt_length=32)
    assert counts == {"rows": 3, "kept": 2, "response:nan_or_missing_score": 2,
                      "response:truncated_to_nothing": 2, "row:fewer_than_2_responses": 1, "truncated_responses": 0}
    assert ds["scores"][0] == pytest.approx([0.1, 0.5, -0.2, 0.3, 0.0])
    assert ds["scores"][1] == pytest.approx([0.2, 0.4, 0.1])
    assert [text(tok, r) for r in ds["response_ids"][1]] == ["s2<eos>", "s4<eos>", "s5<eos>"]


def test_long_prompt_is_left_truncated_and_response_cut_to_fit(tmp_path, tok):
    rows = [{"prompt": "abcdefghij" * 3, "all_generated_responses": ["0123456789" * 3, "short"],
             "all_rm_scores": [1.0, 0.0]}]
    path = write_parquet(tmp_path / "long.parquet", rows)
    # 16 of the long response's 31 tokens (30 characters + EOS) fit: more than min_kept_fraction 0.5.
    ds, counts, logs = prepare(path, tok, max_length=26, max_prompt_length=10)
    prompt_ids = ds["prompt_ids"][0]
    assert len(prompt_ids) == 10 and text(tok, prompt_ids) == "abcdefghij"  # the end of the prompt is kept
    long, short = ds["response_ids"][0]
    assert len(prompt_ids) + len(long) == 26 and text(tok, long) == ("0123456789" * 2)[:16]
    assert text(tok, short) == "short<eos>"
    # Cut responses are trained on but counted, apart from the skips.
    assert counts["truncated_responses"] == 1 and logs[0].endswith("skipped: none; truncated_responses=1")


# ------------------------------------------------------------------------------------------------ binarized
def binarized_rows():
    def conv(p, r):
        return [{"role": "user", "content": p}, {"role": "assistant", "content": r}]

    multi_chosen = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "sum 1 2"}, {"role": "assistant", "content": "3"}]
    multi_rejected = multi_chosen[:3] + [{"role": "assistant", "content": "4"}]
    return [
        {"prompt": "abc", "chosen": conv("abc", "good"), "rejected": conv("abc", "bad"),
         "score_chosen": 8.0, "score_rejected": 4.0},
        {"prompt": "tie", "chosen": conv("tie", "a"), "rejected": conv("tie", "b"),
         "score_chosen": 5.0, "score_rejected": 5.0},
        {"prompt": "nan", "chosen": conv("nan", "a"), "rejected": conv("nan", "b"),
         "score_chosen": 7.0, "score_rejected": None},
        {"prompt": "hi", "chosen": multi_chosen, "rejected": multi_rejected,
         "score_chosen": 9.0, "score_rejected": 2.0},
    ]


def test_binarized_chat_template_and_multi_turn(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "bin.jsonl", binarized_rows())
    assert D.detect_format(D.load_raw_dataset(path).column_names) == "binarized"
    ds, counts, _ = prepare(path, chat_tok, max_length=96, max_prompt_length=64)
    assert counts == {"rows": 4, "kept": 2, "response:nan_or_missing_score": 1,
                      "row:all_scores_tied": 1, "row:fewer_than_2_responses": 1, "truncated_responses": 0}
    assert ds["scores"] == [[8.0, 4.0], [9.0, 2.0]]
    # The prompt goes through the chat template with the generation prompt; K = 2 (chosen, rejected).
    assert text(chat_tok, ds["prompt_ids"][0]) == "<user>abc\n<assistant>"
    assert [text(chat_tok, r) for r in ds["response_ids"][0]] == ["good<eos>", "bad<eos>"]
    # Multi-turn: the conversation before the last assistant turn is the prompt.
    assert text(chat_tok, ds["prompt_ids"][1]) == "<user>hi\n<assistant>hello\n<user>sum 1 2\n<assistant>"
    assert [text(chat_tok, r) for r in ds["response_ids"][1]] == ["3<eos>", "4<eos>"]


# ---------------------------------------------------------------------------------------- local JSONL schema
def responses_rows():
    return [
        {"prompt": "abc", "responses": ["r1", "r2"], "scores": [1.0, 0.0]},
        {"prompt": "def", "responses": ["s1", "s2", "s3", "", "   "], "scores": [0.5, 1.5, None, 2.0, 3.0]},
        {"prompt": "ghi", "responses": ["u1", "u2", "u3"], "scores": [3, 1, 2]},
        {"prompt": "one", "responses": ["v1"], "scores": [1.0]},
        # fewer scores than responses: which score belongs to which response is unknown, the row is skipped
        {"prompt": "jkl", "responses": ["w1", "w2"], "scores": [2.0]},
    ]


def test_local_jsonl_ragged_k(tmp_path, tok):
    path = write_jsonl(tmp_path / "local.jsonl", responses_rows())
    assert D.detect_format(D.load_raw_dataset(path).column_names) == "responses"
    ds, counts, _ = prepare(path, tok)
    assert counts == {"rows": 5, "kept": 3, "response:nan_or_missing_score": 1, "response:empty_response": 2,
                      "row:fewer_than_2_responses": 1, "row:scores_responses_length_mismatch": 1,
                      "truncated_responses": 0}
    assert [len(s) for s in ds["scores"]] == [2, 2, 3]  # ragged K
    assert ds["scores"][1] == [0.5, 1.5]
    assert text(tok, ds["prompt_ids"][0]) == "<bos>abc"  # no chat template: BOS + the text


def test_point_losses_keep_single_response_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "local.jsonl", responses_rows())
    ds, counts, _ = prepare(path, tok, min_responses=1)
    assert counts["kept"] == 4 and "row:fewer_than_2_responses" not in counts
    assert counts["row:scores_responses_length_mismatch"] == 1
    assert [len(s) for s in ds["scores"]] == [2, 2, 3, 1]


def test_local_jsonl_message_prompt_with_chat_template(tmp_path, chat_tok):
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "abc"}],
             "responses": ["x", "y"], "scores": [1.0, 2.0]}]
    path = write_jsonl(tmp_path / "msgs.jsonl", rows)
    ds, _, _ = prepare(path, chat_tok, max_length=96, max_prompt_length=64)
    assert text(chat_tok, ds["prompt_ids"][0]) == "<system>be brief\n<user>abc\n<assistant>"


def test_errors_name_the_problem(tmp_path, tok):
    with pytest.raises(ValueError, match="cannot tell the dataset schema"):
        D.detect_format(["question", "answer"])
    bad = tmp_path / "data.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.json, \.jsonl or \.parquet"):
        D.load_raw_dataset(str(bad))
    path = write_jsonl(tmp_path / "local.jsonl", responses_rows())
    with pytest.raises(ValueError, match="max_prompt_length 65 exceeds max_length 64"):
        prepare(path, tok, max_length=64, max_prompt_length=65)


def test_to_score():
    assert D.to_score("7.5") == 7.5 and D.to_score(3) == 3.0
    for bad in (None, "N/A", "", float("nan"), float("inf"), True, [1]):
        assert D.to_score(bad) is None


# ------------------------------------------------------------------------------------------------- batching
def test_collate_masks_prompt_and_padding(tmp_path, tok):
    path = write_jsonl(tmp_path / "local.jsonl", responses_rows())
    ds, _, _ = prepare(path, tok)
    rows = [dict(zip(ds.column_names, vals)) for vals in zip(*(ds[c] for c in ds.column_names))]
    batch = D.collate(rows, pad_id=tok.pad_token_id, ignore_index=IGNORE)
    B, K, T = batch["input_ids"].shape
    assert (B, K) == (3, 3)
    assert batch["response_mask"].tolist() == [[True, True, False], [True, True, False], [True, True, True]]
    for b, r in enumerate(rows):
        p = len(r["prompt_ids"])
        for k, resp in enumerate(r["response_ids"]):
            n = p + len(resp)
            ids, labels = batch["input_ids"][b, k], batch["labels"][b, k]
            assert ids[:n].tolist() == r["prompt_ids"] + resp
            assert (ids[n:] == tok.pad_token_id).all() and (batch["attention_mask"][b, k, n:] == 0).all()
            # labels[t] is the token after position t, on response tokens only
            assert labels[p - 1 : n - 1].tolist() == resp
            assert (labels[: p - 1] == IGNORE).all() and (labels[n - 1 :] == IGNORE).all()
            assert batch["scores"][b, k].item() == r["scores"][k]
        for k in range(len(r["response_ids"]), K):  # padding responses: no target tokens at all
            assert (batch["labels"][b, k] == IGNORE).all() and (batch["attention_mask"][b, k] == 0).all()
    assert "ref_logps" not in batch
    rows_ref = [{**r, "ref_logps": [-1.0 * (k + 1) for k in range(len(r["scores"]))]} for r in rows]
    ref = D.collate(rows_ref, pad_id=tok.pad_token_id)["ref_logps"]
    assert ref[2].tolist() == [-1.0, -2.0, -3.0] and ref[0, :2].tolist() == [-1.0, -2.0]


def test_data_order_is_independent_of_processes_and_accumulation():
    n, gbs, seed = 50, 8, 3
    assert D.steps_per_epoch(n, gbs) == 6
    seen = []
    for step in range(6):
        g = D.global_batch_indices(n, step, gbs, seed)
        assert g == D.global_batch_indices(n, step, gbs, seed)  # a pure function: resume sees the same order
        seen += g
        # (1 process x 4 accumulation) and (2 processes x 2 accumulation) and (4 x 1) cover the same rows
        for world, ga in ((1, 4), (2, 2), (4, 1)):
            b = gbs // (world * ga)
            parts = [D.micro_batch_indices(g, m, r, world, b) for m in range(ga) for r in range(world)]
            assert sorted(sum(parts, [])) == sorted(g) and all(len(p) == b for p in parts)
    assert len(set(seen)) == 48  # one epoch: no row twice, the incomplete last batch dropped
    assert D.global_batch_indices(n, 6, gbs, seed) != D.global_batch_indices(n, 0, gbs, seed)  # reshuffled
    with pytest.raises(ValueError, match="fewer than one global batch"):
        D.steps_per_epoch(5, 8)


# ------------------------------------------------------------------------------------------- embedded task
@pytest.mark.parametrize("task", embedded.TASKS)
def test_embedded_task_is_verifiable(task):
    rows = embedded.make_task_rows(64, task=task, length=5, k=4, seed=1)
    assert rows == embedded.make_task_rows(64, task=task, length=5, k=4, seed=1)  # deterministic
    for r in rows:
        assert len(r["responses"]) == 4 and len(set(r["scores"])) == 4  # distinct scores: a unique best
        answer_len = len(r["responses"][0])
        assert all(len(x) == answer_len for x in r["responses"])
        assert all(0 <= s <= answer_len and s == math.floor(s) for s in r["scores"])
    train, held_out = embedded.make_task_splits(100, 20, task=task, length=5, seed=1)
    assert len(held_out) == 20 and not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}


def test_embedded_scores_count_correct_characters():
    r = embedded.make_task_rows(1, task="reverse", length=6, k=4, seed=0)[0]
    answer = r["prompt"][:-1][::-1]
    for resp, score in zip(r["responses"], r["scores"]):
        assert score == sum(a == b for a, b in zip(resp, answer))


# ------------------------------------------------------------------------------ bad and edge-case inputs
def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def good_row(i=0):
    return {"prompt": f"p{i}", "responses": ["x", "y"], "scores": [1.0, 0.0]}


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "abc", "responses": ["x", "y"], "scores": 3.0},
     "field 'scores': expected a list of numbers, got float 3.0"),
    ({"prompt": 12345, "responses": ["x", "y"], "scores": [1.0, 0.0]},
     "field 'prompt': expected a string or a list of {role, content} messages, got int 12345"),
    # a string is not a list of one-character responses
    ({"prompt": "abc", "responses": "cba", "scores": [1.0, 2.0, 3.0]},
     "field 'responses': expected a list of strings, got str 'cba'"),
    ({"prompt": "abc", "responses": ["x", 5], "scores": [1.0, 0.0]},
     "field 'responses': expected a list of strings, got int 5 at position 1"),
    ({"prompt": [{"content": "no role"}], "responses": ["x", "y"], "scores": [1.0, 0.0]},
     "field 'prompt': expected a list of {role, content} messages, got dict"),
])
def test_wrong_field_type_is_one_line_naming_file_row_and_field(tmp_path, tok, bad, message):
    rows = [good_row(i) for i in range(5)]
    rows[3] = bad
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(D.DataError) as e:
        D.prepare_dataset(D.load_raw_dataset(path), tok, max_length=64, max_prompt_length=32, source="data.jsonl",
                          log=None)
    assert one_line(e).startswith(f"data.jsonl row 3, {message}")


def test_row_error_crosses_processes_and_names_the_file_row_of_a_split(tmp_path, tok):
    rows = [good_row(i) for i in range(40)]
    rows[29] = {"prompt": "abc", "responses": ["x", "y"], "scores": 3.0}
    raw = D.load_raw_dataset(write_jsonl(tmp_path / "data.jsonl", rows))
    # train.py carves held-out rows with a seeded shuffle: the message still names the row of the file.
    train = raw.train_test_split(test_size=8, seed=0)["train"]
    for num_proc in (None, 2):
        with pytest.raises(D.DataError) as e:
            D.prepare_dataset(train, tok, max_length=64, max_prompt_length=32, num_proc=num_proc,
                              source="data.jsonl", log=None)
        assert one_line(e) == "data.jsonl row 29, field 'scores': expected a list of numbers, got float 3.0"


@pytest.mark.parametrize("fmt, row, message", [
    ("armorm", {"prompt": "a", "all_generated_responses": ["x", "y"], "all_rm_scores": 0.5},
     "field 'all_rm_scores': expected a list of numbers, got float 0.5"),
    ("armorm", {"prompt": "a", "all_generated_responses": "xy", "all_rm_scores": [0.5, 0.1]},
     "field 'all_generated_responses': expected a list of strings, got str 'xy'"),
    ("ultrafeedback", {"instruction": "a", "completions": "abc"},
     "field 'completions': expected a list of objects, got str 'abc'"),
    ("ultrafeedback", {"instruction": "a", "completions": [{"response": 7, "overall_score": 1.0}]},
     "field 'completions[0].response': expected a string, got int 7"),
    ("ultrafeedback", {"instruction": "a", "completions": [{"response": "x", "overall_score": [1.0]}]},
     "field 'completions[0].overall_score': expected a number, got list [1.0]"),
    ("binarized", {"prompt": "a", "chosen": "good", "rejected": [], "score_chosen": 1.0, "score_rejected": 0.0},
     "field 'chosen': expected a list of {role, content} messages, got str 'good'"),
    ("binarized", {"prompt": "a", "chosen": [], "rejected": [], "score_chosen": {"x": 1}, "score_rejected": 0.0},
     "field 'score_chosen': expected a number, got dict {'x': 1}"),
])
def test_wrong_field_types_of_every_schema(fmt, row, message):
    with pytest.raises(D.DataError) as e:
        D.normalize_row(row, fmt)
    assert one_line(e) == message


def test_chat_template_refusal_names_the_row(tmp_path):
    strict = embedded.build_char_tokenizer()
    strict.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must "
                            "come from the user') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    rows = [good_row(0), {**good_row(1), "prompt": [{"role": "system", "content": "x"}]}]
    with pytest.raises(D.DataError) as e:
        D.prepare_dataset(D.load_raw_dataset(write_jsonl(tmp_path / "d.jsonl", rows)), strict, max_length=64,
                          max_prompt_length=32, source="d.jsonl", log=None)
    assert one_line(e) == ("d.jsonl row 1, the tokenizer's chat template rejects the prompt: the first message "
                           "must come from the user")


@pytest.mark.parametrize("fmt", ["responses", "armorm"])
@pytest.mark.parametrize("n_scores", [1, 3])
def test_score_count_mismatch_skips_the_row(tmp_path, tok, fmt, n_scores):
    keys = ("responses", "scores") if fmt == "responses" else ("all_generated_responses", "all_rm_scores")
    rows = [{"prompt": "abc", keys[0]: ["x", "y"], keys[1]: [1.0, 0.0]},
            {"prompt": "def", keys[0]: ["x", "y"], keys[1]: [3.0, 2.0, 1.0][:n_scores]}]
    ds, counts, logs = prepare(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    assert counts == {"rows": 2, "kept": 1, "row:scores_responses_length_mismatch": 1, "truncated_responses": 0}
    assert "row:scores_responses_length_mismatch=1" in logs[0]


@pytest.mark.parametrize("content, message", [
    ("", "data.jsonl: empty file, no rows"),
    ("\n  \n\n", "data.jsonl: empty file, no rows"),
    ('{"prompt": "a", "responses": ["x"], "scores": [1]}\n{"prompt": "b", "responses": ["x"], "scores": [1]\n',
     "data.jsonl line 2: invalid JSON: Expecting ',' delimiter (column 50)"),
    ('{"prompt": "a", "responses": ["x"], "scores": [1]}\n\n{"prompt": "b", "responses": ["x"], "scores": [1e400]}\n',
     "data.jsonl line 3: number 1e400 is outside the float64 range"),
    ('{"prompt": "a", "responses": ["x"], "scores": [1]}\n["b", ["x"], [1]]\n',
     "data.jsonl line 2: expected a JSON object (one row), got list of list/string"),
    ('[\n {"prompt": "a", "responses": ["x"], "scores": [1]},\n {"prompt": "b" "responses": ["x"]}\n]\n',
     "data.jsonl line 3: invalid JSON: Expecting ',' delimiter (column 17)"),
    (b'{"prompt": "a", "responses": ["x"], "scores": [1]}\n{"prompt": "b\xff", "responses": ["x"], "scores": [1]}\n',
     "data.jsonl line 2: not UTF-8 text (byte 0xff)"),
])
def test_unreadable_file_is_one_line_naming_file_and_line(tmp_path, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(D.DataError) as e:
        D.load_raw_dataset("data.jsonl")
    assert one_line(e) == message


def test_mixed_type_field_is_named(tmp_path):
    # datasets >= 4 reads a mixed-type column as Json; older versions fail on it, and then this names it.
    path = write_jsonl(tmp_path / "data.jsonl", [good_row(0), good_row(1), {**good_row(2), "scores": 3.0}])
    assert D._json_file_problem(path) == (" line 3", "field 'scores' is number here but list of number at line 1 "
                                                    "(mixed types)")


def test_huge_scores_fit_the_batch(tmp_path, tok):
    rows = [{"prompt": "abc", "responses": ["x", "y", "z"], "scores": [1e300, -1e300, 2.5]}]
    ds, counts, _ = prepare(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    batch = D.collate([dict(zip(ds.column_names, v)) for v in zip(*(ds[c] for c in ds.column_names))],
                      pad_id=tok.pad_token_id)
    assert batch["scores"].dtype == torch.float64 and batch["scores"][0].tolist() == [1e300, -1e300, 2.5]
    assert D.to_score(10**400) is None and D.to_score("1e400") is None


def test_truncation_never_trains_on_equal_texts():
    """--max-length 3 --max-prompt-length 2 on the embedded task: every response keeps 1 of its 7 tokens."""
    tok = embedded.build_char_tokenizer()
    raw = datasets.Dataset.from_list(embedded.make_task_rows(64, length=6, k=4, seed=0))
    ds, counts = D.prepare_dataset(raw, tok, max_length=3, max_prompt_length=2, log=None)
    assert counts == {"rows": 64, "kept": 0, "response:mostly_truncated": 256, "row:fewer_than_2_responses": 64,
                      "truncated_responses": 0}
    # Without the fraction rule, the 1-token stubs collide: equal stubs are never kept as a preference.
    ds, counts = D.prepare_dataset(raw, tok, max_length=3, max_prompt_length=2, min_kept_fraction=0.0, log=None)
    assert counts["response:identical_texts_different_scores"] > 0
    for resp in ds["response_ids"]:
        assert len({tuple(r) for r in resp}) == len(resp) >= 2
    assert counts["truncated_responses"] == sum(len(r) for r in ds["response_ids"])


def test_duplicates_and_mostly_truncated_responses_are_counted(tmp_path, tok):
    rows = [{"prompt": "p", "responses": ["x", "x", "y", "z", "z"], "scores": [1, 1, 2, 3, 4]},
            {"prompt": "q", "responses": ["0123456789", "ab", "cd"], "scores": [3, 2, 1]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    # "<bos>q" leaves 5 of 7 positions: "0123456789<eos>" would keep 5 of its 11 tokens (< 0.5).
    ds, counts, logs = prepare(path, tok, max_length=7, max_prompt_length=4)
    assert counts == {"rows": 2, "kept": 2, "response:duplicate": 1, "response:identical_texts_different_scores": 2,
                      "response:mostly_truncated": 1, "truncated_responses": 0}
    assert ds["scores"] == [[1.0, 2.0], [2.0, 1.0]]
    assert "response:mostly_truncated=1" in logs[0] and logs[0].endswith("; truncated_responses=0")
    ds, counts, logs = prepare(path, tok, max_length=8, max_prompt_length=4)  # 6 of 11 kept: trained on, counted
    assert "response:mostly_truncated" not in counts and counts["truncated_responses"] == 1
    assert text(tok, ds["response_ids"][1][0]) == "012345"


def test_unknown_characters_are_counted(tmp_path, tok):
    rows = [{"prompt": "abc", "responses": ["x", "café", "y"], "scores": [1, 2, 3]},
            {"prompt": "Ünïcode", "responses": ["x", "y"], "scores": [1, 2]}]
    _, counts, _ = prepare(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    assert counts == {"rows": 2, "kept": 1, "response:unknown_tokens": 1, "row:prompt_unknown_tokens": 1,
                      "truncated_responses": 0}
    # GPT-2 style: the unk token doubles as EOS and is never produced for text, so it means nothing there.
    gpt2_like = embedded.build_char_tokenizer()
    gpt2_like.unk_token = gpt2_like.eos_token
    assert D.unknown_token_id(tok) == tok.unk_token_id and D.unknown_token_id(gpt2_like) is None


def test_first_writer_batch_of_skipped_rows(tok):
    rows = [{"prompt": "", "responses": ["x", "y"], "scores": [1.0, 0.0]}] * 1001 + [good_row()]
    ds, counts = D.prepare_dataset(datasets.Dataset.from_list(rows), tok, max_length=16, max_prompt_length=8,
                                   log=None)
    assert counts["kept"] == 1 and counts["row:empty_prompt"] == 1001
    assert text(tok, ds["response_ids"][0][0]) == "x<eos>"


def test_schema_errors_are_data_errors(tmp_path, tok):
    with pytest.raises(D.DataError, match="cannot tell the dataset schema"):
        D.detect_format(["question", "answer"])
    raw = datasets.Dataset.from_list([good_row()])
    with pytest.raises(D.DataError) as e:
        D.prepare_dataset(raw, tok, fmt="armorm", source="d.jsonl", log=None)
    assert one_line(e) == ("d.jsonl: the armorm schema needs the column(s) all_generated_responses, all_rm_scores; "
                           "the dataset has prompt, responses, scores")


@pytest.mark.parametrize("name", ["missing.jsonl", "./missing", "data/sub/missing", "~/mppo-missing-dir/x",
                                  "missing/"])
def test_missing_path_fails_at_once_without_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.setattr(datasets, "get_dataset_split_names", no_hub)
    with pytest.raises(D.DataError) as e:
        D.load_splits(name)
    assert one_line(e) == f"--dataset {name!r}: no such file or directory"


def test_looks_like_path():
    for name in ("d.jsonl", "D.PARQUET", "./d", "../d", "/abs", "~/d", "dir/", "a/b/c"):
        assert D.looks_like_path(name), name
    for name in ("HuggingFaceH4/ultrafeedback_binarized", "Qwen/Qwen2.5-0.5B", "imdb"):
        assert not D.looks_like_path(name), name


def test_hub_failure_is_one_line_and_fast():
    t0 = time.monotonic()
    with pytest.raises(D.DataError) as e:  # HF_HUB_OFFLINE=1 (conftest.py)
        D.load_splits("mppo-nobody/no-such-dataset")
    assert one_line(e).startswith("hub dataset 'mppo-nobody/no-such-dataset': cannot load it: ")
    assert time.monotonic() - t0 < 5


def test_load_splits_local_file_and_directory(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [good_row(i) for i in range(3)])
    train, held_out = D.load_splits(path)
    assert len(train) == 3 and held_out is None
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "train.jsonl", [good_row(i) for i in range(4)])
    train, held_out = D.load_splits(str(tmp_path / "dir"))
    assert len(train) == 4 and held_out is None
