"""augment.py on tiny local models built in code and saved with ``save_pretrained`` (loaded back through the
real ``from_pretrained`` path): sampling, reward-model and function scoring, the written schema and its
provenance, resuming (torn last line included), deduplication of prompts and responses, new-prompt writing,
bad rows and options, and on-policy sampling from the checkpoint given."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from tests.training.tiny_models import chain, char_tokenizer, reward_model, save, scripted_llama  # noqa: E402
from training import augment, embedded  # noqa: E402
from training import data as D  # noqa: E402
from training.generation import Sampling, encode_prompts, sample_batches  # noqa: E402
from training.options import UsageError  # noqa: E402
from training.scoring import ScorerError, conversation_ids  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Directories of a random policy, a reward model (both with a chat template) and a scripted policy that
    answers every prompt with "xyz"."""
    root = tmp_path_factory.mktemp("models")
    tok = char_tokenizer(chat=True)
    return {"policy": save(embedded.build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=4, seed=1), tok,
                           root / "policy"),
            "rm": save(reward_model(tok), tok, root / "rm"),
            "scripted": save(scripted_llama(tok, chain(">xyz")), tok, root / "scripted")}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


PROMPTS = ['"abc<"', '{"prompt": "cab<"}', '"ABC<"', '"  abc< "', '""', '[{"role": "user", "content": "ba<"}]',
           '{"prompt": "dd:"}']


def test_policy_samples_reward_model_scores(tmp_path, models):
    """K samples per prompt from the policy, each scored by the reward model on the chat-formatted prompt +
    response; the rows are the responses schema the trainer reads; duplicates and empties are counted."""
    prompts = write_lines(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out.jsonl"
    counts = augment.main(["--prompts", prompts, "--policy", models["policy"], "--reward-model", models["rm"],
                           "--num-samples", "3", "--max-new-tokens", "6", "--batch-size", "2", "--output", str(out),
                           "--no-progress"])
    rows = read_rows(out)
    # "ABC<" and "  abc< " repeat "abc<" (case and spacing ignored), "" is empty.
    assert counts["prompts_read"] == 7 and counts["prompt:duplicate"] == 2 and counts["prompt:empty"] == 1
    assert [r["prompt"] for r in rows] == ["abc<", "cab<", [{"role": "user", "content": "ba<"}], "dd:"]
    assert counts["responses"] == sum(len(r["responses"]) for r in rows)
    assert counts["responses"] + counts["response:empty"] + counts["response:duplicate"] == 4 * 3
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = AutoModelForSequenceClassification.from_pretrained(models["rm"])
    tok = AutoTokenizer.from_pretrained(models["rm"])
    for r in rows:
        assert len(r["responses"]) == len(r["scores"]) == len(set(r["responses"]))
        assert all(x.strip() for x in r["responses"])
        for text, score in zip(r["responses"], r["scores"]):  # one at a time, unpadded
            with torch.no_grad():
                direct = rm(input_ids=torch.tensor([conversation_ids(tok, r["prompt"], text)])).logits[0, 0].item()
            assert score == pytest.approx(direct, abs=1e-5)
    # The same samples as generating directly from the policy with the same seed and batches.
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(models["policy"])
    ids = encode_prompts(tok, [r["prompt"] for r in rows])
    s = Sampling(max_new_tokens=6, num_samples=3, do_sample=True)
    direct = [t for _, texts, _ in sample_batches(policy, tok, ids, s, batch_size=2, seed=0) for t in texts]
    assert [r["responses"] for r in rows] == [list(dict.fromkeys(t for t in d if t.strip())) for d in direct]
    prov = json.loads((tmp_path / "out.provenance.json").read_text())
    assert prov["complete"] and prov["rows_in_file"] == 4 and prov["settings"]["reward_model"] == models["rm"]
    run = prov["runs"][0]
    assert run["models"]["policy"] == models["policy"] and run["counts"]["responses"] == counts["responses"]
    assert run["stamp"]["git_dirty"] in (True, False, "unknown") and run["stamp"]["torch"] == torch.__version__
    # What train.py reads: the responses schema, nothing malformed.
    ds, c = D.prepare_dataset(D.load_raw_dataset(str(out)), tok, max_length=32, max_prompt_length=16, log=None)
    assert c["rows"] == 4


def test_resume_skips_written_prompts_and_cuts_a_torn_line(tmp_path, models, capsys):
    prompts = write_lines(tmp_path / "p.txt", [f"{a}{b}{c}<" for a in "abc" for b in "abc" for c in "ab"])
    argv = ["--prompts", prompts, "--policy", models["policy"], "--scorer", "training.embedded:correct_characters",
            "--num-samples", "2", "--max-new-tokens", "4", "--batch-size", "4", "--no-progress"]
    full, cut = tmp_path / "full" / "o.jsonl", tmp_path / "cut" / "o.jsonl"
    augment.main([*argv, "--output", str(full)])
    text = full.read_text()
    lines = text.splitlines(keepends=True)
    cut.parent.mkdir()
    cut.write_text("".join(lines[:7]) + lines[7][:10])  # 7 rows and half of the 8th: a crash mid-write
    shutil.copy(full.with_name("o.provenance.json"), cut.with_name("o.provenance.json"))
    counts = augment.main([*argv, "--output", str(cut)])
    assert cut.read_text() == text  # the same rows, in the same order, as the uninterrupted run
    assert counts["prompts_already_written"] == 7 and counts["rows_written"] == len(lines) - 7
    assert "cut off a torn last line (10 bytes)" in capsys.readouterr().out
    assert len(json.loads(cut.with_name("o.provenance.json").read_text())["runs"]) == 2
    # Other settings never extend the file; --overwrite replaces it.
    with pytest.raises(UsageError, match=r"made with other settings \(seed 0 -> 1\)"):
        augment.main([*argv, "--output", str(cut), "--seed", "1"])
    augment.main([*argv, "--output", str(cut), "--seed", "1", "--overwrite"])
    assert cut.read_text() != text and len(cut.read_text().splitlines()) == len(lines)
    (tmp_path / "stray.jsonl").write_text("{}\n")
    with pytest.raises(UsageError, match="without .*provenance.json"):
        augment.main([*argv, "--output", str(tmp_path / "stray.jsonl")])


SCORER = '''
def score(prompt, response):
    return None if response.startswith("x") and prompt.startswith("q") else len(response)
'''


def test_new_prompts_dedup_and_function_scorer(tmp_path, models, monkeypatch):
    """The scripted policy writes "xyz" for every few-shot request, so after the first new prompt every
    attempt is a duplicate; its K identical samples collapse to one; a scorer returning None drops one."""
    monkeypatch.chdir(tmp_path)  # the scorer module is importable from the current directory, as with python -m
    (tmp_path / "my_scorer.py").write_text(SCORER)
    prompts = write_lines(tmp_path / "p.txt", ["abc<", "qq<", "ba<"])
    out = tmp_path / "o.jsonl"
    argv = ["--prompts", prompts, "--policy", models["scripted"], "--scorer", "my_scorer:score", "--new-prompts", "3",
            "--few-shot", "2", "--prompt-temperature", "0", "--num-samples", "4", "--output", str(out), "--no-progress"]
    counts = augment.main(argv)
    rows = read_rows(out)
    assert [r["prompt"] for r in rows] == ["abc<", "ba<", "xyz"]  # "qq<": its only response was unscorable
    assert all(r["responses"] == ["xyz"] and r["scores"] == [3.0] for r in rows)
    assert counts["new_prompts_written"] == 1 and counts["new_prompt:duplicate"] == 4 * 3 - 1
    assert counts["response:duplicate"] == 4 * 3 and counts["response:unscorable"] == 1
    assert counts["row:no_responses_left"] == 1
    assert (tmp_path / "o.new_prompts.jsonl").read_text() == '"xyz"\n'
    # A seed set that already holds "xyz": nothing new can be written.
    prompts = write_lines(tmp_path / "p2.txt", ["XYZ", "abc<"])
    counts = augment.main([*argv[2:], "--prompts", prompts, "--output", str(tmp_path / "o2.jsonl")])
    assert counts["new_prompts_written"] == 0 and counts["new_prompt:duplicate"] == 12


def test_seed_datasets_of_every_schema(tmp_path):
    rows = {
        "ultrafeedback": {"instruction": "u<", "completions": [{"response": "a", "overall_score": 1.0}]},
        "armorm": {"prompt": "a<", "all_generated_responses": ["x"], "all_rm_scores": [0.5]},
        "binarized": {"prompt": "b<",
                      "chosen": [{"role": "user", "content": "b<"}, {"role": "assistant", "content": "x"}],
                      "rejected": [{"role": "user", "content": "b<"}, {"role": "assistant", "content": "y"}],
                      "score_chosen": 2.0, "score_rejected": 1.0},
        "responses": {"prompt": [{"role": "user", "content": "r<"}], "responses": ["x"], "scores": [1.0]},
    }
    from training.prompts import read_seed_dataset

    for fmt, row in rows.items():
        path = write_lines(tmp_path / f"{fmt}.jsonl", [json.dumps(row)] * 2)
        expected = row.get("instruction") or row["prompt"]
        assert read_seed_dataset(path) == [expected] * 2, fmt
    bad = [json.dumps(rows["armorm"]), json.dumps({**rows["armorm"], "prompt": 7})]
    path = write_lines(tmp_path / "bad.jsonl", bad)
    with pytest.raises(D.DataError, match=r"bad.jsonl row 1, field 'prompt': expected a string"):
        read_seed_dataset(path)


@pytest.mark.parametrize("lines, message", [
    (['"a<"', "{oops"], r"p.jsonl line 2: invalid JSON"),
    (['"a<"', "7"], r"p.jsonl line 2: expected a prompt"),
    (['{"prompt": [{"content": "x"}]}'], r"p.jsonl line 1: expected a prompt"),
])
def test_bad_prompt_rows_name_the_line(tmp_path, lines, message):
    from training.prompts import read_prompt_list

    with pytest.raises(D.DataError, match=message):
        read_prompt_list(write_lines(tmp_path / "p.jsonl", lines))


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "p.txt"], "need --policy"),
    (["--policy", "{policy}", "--prompts", "{prompts}"], "need --reward-model or --scorer"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--policy", "./no/such/dir"], "--policy ./no/such/dir: no such file or directory"),
    (["--reward-model", "r", "--scorer", "m:f"], "not both"),
    (["--hidden-size", "30", "--num-heads", "4"], "must be a multiple of --num-heads"),
])
def test_bad_options_name_the_argument(argv, message, tmp_path, models, capsys):
    prompts = write_lines(tmp_path / "p.txt", ["a<"])
    argv = [a.format(policy=models["policy"], prompts=prompts) for a in argv]
    with pytest.raises(SystemExit) as e:
        augment.parse_args([*argv, "--output", str(tmp_path / "o.jsonl")])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unusable_scorers_are_one_line(tmp_path, models):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=2, pad_token_id=0)
    two = save(LlamaForSequenceClassification(config), tok, tmp_path / "rm2")
    prompts = write_lines(tmp_path / "p.txt", ["a<"])
    base = ["--prompts", prompts, "--policy", models["policy"], "--max-new-tokens", "4", "--no-progress",
            "--output", str(tmp_path / "o.jsonl")]
    with pytest.raises(ScorerError, match="expected a scalar head \\(num_labels=1\\), got num_labels=2"):
        augment.main([*base, "--reward-model", two])
    with pytest.raises(ScorerError, match="cannot import no_such_module"):
        augment.main([*base, "--scorer", "no_such_module:f", "--overwrite"])
    with pytest.raises(ScorerError, match="raised TypeError"):
        augment.main([*base, "--scorer", "training.embedded:make_task_rows", "--overwrite"])
    with pytest.raises(UsageError, match=f"--policy {tmp_path}: cannot load it"):
        (tmp_path / "config.json").write_text("{}")
        augment.main([*base, "--policy", str(tmp_path), "--scorer", "m:f", "--overwrite"])


def test_embedded_pipeline_is_on_policy(tmp_path):
    """With no model arguments but a checkpoint: the embedded task's training prompts (never its held-out
    ones), K samples from that checkpoint, scored by the task's verifier. The same seed gives exactly the
    samples of generating from that checkpoint directly; another checkpoint gives other samples."""
    tok = char_tokenizer()
    ckpts = [save(embedded.build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=4, seed=s), tok,
                  tmp_path / f"ckpt{s}") for s in (1, 2)]
    task = ["--train-size", "40", "--eval-size", "8", "--task-length", "4", "--num-samples", "3", "--no-progress"]
    outs = []
    for i, ckpt in enumerate(ckpts):
        out = tmp_path / f"o{i}.jsonl"
        augment.main([*task, "--policy", ckpt, "--output", str(out)])
        outs.append(read_rows(out))
    train_rows, held_out = embedded.make_task_splits(40, 8, length=4)
    assert [r["prompt"] for r in outs[0]] == [r["prompt"] for r in train_rows]
    assert not {r["prompt"] for r in outs[0]} & {r["prompt"] for r in held_out}
    verify = embedded.verifier("reverse", 4)
    assert all(s == verify(r["prompt"], t) for r in outs[0] for t, s in zip(r["responses"], r["scores"]))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpts[0])
    ids = encode_prompts(tok, [r["prompt"] for r in train_rows])
    s = Sampling(max_new_tokens=5, num_samples=3, do_sample=True)  # the answer's length + 1
    direct = [t for _, texts, _ in sample_batches(model, tok, ids, s, batch_size=64, seed=0) for t in texts]
    assert [r["responses"] for r in outs[0]] == [list(dict.fromkeys(t for t in d if t.strip())) for d in direct]
    assert [r["responses"] for r in outs[0]] != [r["responses"] for r in outs[1]]
