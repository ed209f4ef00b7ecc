"""Generation and the generation-quality evaluation: the embedded task's verifier, batched generation up to
EOS, reproducible seeded sampling, the exact-match metric and its sharding over processes, and train.py's
records of it (metrics.jsonl, summary.json, the log, the held-out prompts it uses)."""

import os
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tests.training.tiny_models import chain, char_tokenizer, scripted_llama  # noqa: E402
from training import embedded  # noqa: E402
from training.evaluation import evaluate_generation  # noqa: E402
from training.generation import Sampling, encode_prompts, generate, sample_batches  # noqa: E402


@pytest.mark.parametrize("task", embedded.TASKS)
def test_verifier_reproduces_the_task_scores(task):
    """The verifier's score of every generated (corrupted) response is the score the task gave it."""
    verify = embedded.verifier(task, 5)
    for row in embedded.make_task_rows(50, task=task, length=5, k=4, seed=3):
        assert [verify(row["prompt"], r) for r in row["responses"]] == row["scores"]
        assert max(row["scores"]) <= embedded.answer_length(task, 5)


def test_task_answer_and_correct_characters():
    assert embedded.task_answer("abcdef<", "reverse", 6) == "fedcba"
    assert embedded.task_answer("dbca:", "sort", 4) == "abcd"
    assert embedded.task_answer("7+15=", "add", 2) == "022"  # answers are zero-padded to length + 1
    for prompt, task, length in (("abcdef>", "reverse", 6), ("abcde<", "reverse", 6), ("1+2", "add", 2),
                                 ("123+1=", "add", 2), (["abc<"], "reverse", 3)):
        assert embedded.task_answer(prompt, task, length) is None, prompt
    assert embedded.correct_characters("fedcba", "fedcba") == 6
    assert embedded.correct_characters("fexcba", "fedcba") == 5
    assert embedded.correct_characters("fed", "fedcba") == 3
    assert embedded.correct_characters("fedcbaxx", "fedcba") == 4  # running on costs a character each
    assert embedded.correct_characters("zzzzzzzzz", "fedcba") == 0  # never below 0
    assert embedded.verifier("reverse", 6)("not a prompt", "x") is None


def test_generate_stops_at_eos_and_flags_cut_responses():
    tok = char_tokenizer()
    model = scripted_llama(tok, {**chain("<abc"), **chain(">xyzxyz", then="x")})
    ids = encode_prompts(tok, ["qq<", "qq>"])
    texts, finished = generate(model, tok, ids, Sampling(max_new_tokens=5))
    assert texts == [["abc"], ["xyzxy"]] and finished == [[True], [False]]
    texts, _ = generate(model, tok, ids, Sampling(max_new_tokens=5, num_samples=3, do_sample=True), seed=0)
    assert texts == [["abc"] * 3, ["xyzxy"] * 3]  # K samples per prompt, adjacent
    # The chat template is applied as the trainer applies it: the generation prompt ends in ">".
    chat = char_tokenizer(chat=True)
    assert generate(model, chat, encode_prompts(chat, ["qq<"]), Sampling(max_new_tokens=5))[0] == [["xyzxy"]]


def test_seeded_sampling_is_reproducible_per_batch():
    """Batch j is sampled from seed (seed, j): the same seed repeats the samples, another changes them, and
    leaving batches out (resuming) does not change the others."""
    tok = char_tokenizer()
    model = embedded.build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=4, seed=1)
    ids = encode_prompts(tok, [r["prompt"] for r in embedded.make_task_rows(10, length=4)])
    s = Sampling(max_new_tokens=5, num_samples=3, do_sample=True)
    run = lambda seed, **kw: {start: texts for start, texts, _ in  # noqa: E731
                              sample_batches(model, tok, ids, s, batch_size=4, seed=seed, **kw)}
    first, again, other = run(0), run(0), run(1)
    assert first == again and first != other and sorted(first) == [0, 4, 8]
    assert run(0, skip=lambda start, stop: start == 0) == {4: first[4], 8: first[8]}
    state = torch.get_rng_state()
    run(0)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left as it was


class OneOf:
    """A stand-in for one process of an accelerate run: its rank, the world size, and a sum over processes
    that returns this process's part (the test adds the parts)."""

    def __init__(self, rank, world):
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")

    def autocast(self):
        return nullcontext()

    def reduce(self, t, reduction):
        return t


def test_exact_match_metric_and_its_sharding():
    tok = char_tokenizer()
    model = scripted_llama(tok, {**chain("<cba"), **chain(">xy")})  # answers "cba" to ...<, "xy" to ...>
    prompts = ["abc<", "xyz<", "xy>", "yx>", "acb<"]
    answers = ["cba", "zyx", "xy", "yx", "bca"]
    res = evaluate_generation(model, tok, prompts, answers, OneOf(0, 1), batch_size=2)
    assert res == {"eval/exact_match": 2 / 5, "eval/correct_chars": (3 + 0 + 2 + 0 + 1) / 5,
                   "eval/generated_prompts": 5}
    # Two processes: batches 0 and 2 on rank 0, batch 1 on rank 1; every prompt counted once.
    parts = [evaluate_generation(model, tok, prompts, answers, OneOf(r, 2), batch_size=2) for r in (0, 1)]
    assert [p["eval/generated_prompts"] for p in parts] == [3, 2]
    for key in ("eval/exact_match", "eval/correct_chars"):
        assert sum(p[key] * p["eval/generated_prompts"] for p in parts) / 5 == pytest.approx(res[key])


def test_generation_set_is_the_embedded_held_out(capsys):
    """train.py generates on the held-out prompts of the embedded task, also when it trains on other data of
    the task (--generation-eval embedded): the same prompts, so rounds compare; otherwise it says it skips."""
    from accelerate.utils import DistributedType

    from training import train

    def prompts(argv):
        run = SimpleNamespace(args=train.parse_args(argv), accelerator=SimpleNamespace(
            distributed_type=DistributedType.NO, print=print))
        return train.generation_set(run)

    held_out = [r["prompt"] for r in embedded.make_task_splits(4096, 512)[1]]
    got, answers = prompts([])
    assert list(got) == held_out and answers[0] == held_out[0][:-1][::-1]
    data = os.path.join(os.path.dirname(__file__), "test_generation.py")  # any existing file: not read here
    assert prompts(["--dataset", data, "--generation-eval", "embedded"])[0] == held_out
    assert prompts(["--generation-eval-prompts", "100"])[0] == held_out[:100]
    assert prompts(["--dataset", data]) == () and "generation eval: skipped" in capsys.readouterr().out
    assert prompts(["--generation-eval", "none"]) == ()


def test_train_records_exact_match(tmp_path):
    """Before, every eval step and after: in metrics.jsonl, summary.json, the printed lines and the plot."""
    from tests.training.test_train import TINY, records, run, summary

    out = tmp_path / "run"
    log = run([*TINY, "--output-dir", str(out), "--report-to", "none"])
    evals = [r for r in records(out) if "eval/likelihood_top_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(r["eval/generated_prompts"] == 64 and 0 <= r["eval/exact_match"] <= 1 for r in evals)
    s = summary(out)
    for when in ("before", "after"):
        assert 0 <= s[when]["eval/correct_chars"] <= 6 and "eval/exact_match" in s[when]
    assert f"greedy exact match: before {s['before']['eval/exact_match']:.3f} -> after " in log
    assert "step 3: held-out likelihood-top accuracy" in log and ", exact match " in log
    assert (out / "training_curves.png").stat().st_size > 10_000
