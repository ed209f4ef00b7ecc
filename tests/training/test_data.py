"""Dataset readers on small local files of each schema (written here, no network), skip counting, chat
templates, prompt masking, batching and the data order that resume and multi-process runs rely on."""

import json
import math

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
                      "row:fewer_than_2_responses": 1, "row:all_scores_tied": 1, "row:empty_prompt": 1}
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
                      "response:truncated_to_nothing": 2, "row:fewer_than_2_responses": 1}
    assert ds["scores"][0] == pytest.approx([0.1, 0.5, -0.2, 0.3, 0.0])
    assert ds["scores"][1] == pytest.approx([0.2, 0.4, 0.1])
    assert [text(tok, r) for r in ds["response_ids"][1]] == ["s2<eos>", "s4<eos>", "s5<eos>"]


def test_long_prompt_is_left_truncated_and_response_cut_to_fit(tmp_path, tok):
    rows = [{"prompt": "abcdefghij" * 3, "all_generated_responses": ["0123456789" * 3, "short"],
             "all_rm_scores": [1.0, 0.0]}]
    path = write_parquet(tmp_path / "long.parquet", rows)
    ds, counts, _ = prepare(path, tok, max_length=24, max_prompt_length=10)
    prompt_ids = ds["prompt_ids"][0]
    assert len(prompt_ids) == 10 and text(tok, prompt_ids) == "abcdefghij"  # the end of the prompt is kept
    long, short = ds["response_ids"][0]
    assert len(prompt_ids) + len(long) == 24 and text(tok, long) == ("0123456789" * 2)[:14]
    assert text(tok, short) == "short<eos>"


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
                      "row:all_scores_tied": 1, "row:fewer_than_2_responses": 1}
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
        {"prompt": "jkl", "responses": ["w1", "w2"], "scores": [2.0]},  # a response without a score
    ]


def test_local_jsonl_ragged_k(tmp_path, tok):
    path = write_jsonl(tmp_path / "local.jsonl", responses_rows())
    assert D.detect_format(D.load_raw_dataset(path).column_names) == "responses"
    ds, counts, _ = prepare(path, tok)
    assert counts == {"rows": 5, "kept": 3, "response:nan_or_missing_score": 2, "response:empty_response": 2,
                      "row:fewer_than_2_responses": 2}
    assert [len(s) for s in ds["scores"]] == [2, 2, 3]  # ragged K
    assert ds["scores"][1] == [0.5, 1.5]
    assert text(tok, ds["prompt_ids"][0]) == "<bos>abc"  # no chat template: BOS + the text


def test_point_losses_keep_single_response_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "local.jsonl", responses_rows())
    ds, counts, _ = prepare(path, tok, min_responses=1)
    assert counts["kept"] == 5 and "row:fewer_than_2_responses" not in counts
    assert [len(s) for s in ds["scores"]] == [2, 2, 3, 1, 1]


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
