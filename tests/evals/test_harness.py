"""The lm-evaluation-harness adapter, offline: a task in a local YAML over a local JSONL file, run by lm_eval
itself, gives the log-likelihoods and greedy continuations our model computes without it."""

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install 'minimax-gpt[eval]')")

from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig  # noqa: E402
from minimax_gpt.data.tokenizer import build_tokenizer  # noqa: E402
from minimax_gpt.training.checkpoint import save_checkpoint  # noqa: E402

DOCS = [{"question": "The cat sat on the", "choices": [" mat", " hat", " roof of the house"], "answer": 0},
        {"question": "One, two,", "choices": [" three", " four"], "answer": 0},
        {"question": "Long live the", "choices": [" king", " queen", " kin"], "answer": 1}]


def _task_files(folder, data):
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'hf'}\n"
              f"test_split: test\n")
    (folder / "choice.yaml").write_text(
        "task: mm_choice\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "rolling.yaml").write_text(
        "task: mm_rolling\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{question}}'\nmetric_list:\n  - metric: word_perplexity\n")
    (folder / "gen.yaml").write_text(
        "task: mm_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{choices[0]}}'\ngeneration_kwargs:\n  until: ['e']\n  max_gen_toks: 6\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import minimax_gpt.evals.harness as harness
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    config = MiniMaxConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32, lightning_chunk_size=8,
                           layer_types=["lightning", "softmax"])
    model = EnhancedMiniMaxGPT(config).eval()
    tokenizer = build_tokenizer("bytes")
    save_checkpoint(folder / "ckpt", model, tokenizer)
    _task_files(folder, folder / "docs.jsonl")
    results = lm_eval.simple_evaluate(model=harness.MODEL_NAME, model_args=f"checkpoint={folder / 'ckpt'},device=cpu",
                                      tasks=["mm_choice", "mm_rolling", "mm_gen"], log_samples=True,
                                      task_manager=TaskManager(include_path=str(folder)))
    return model, tokenizer, results["samples"]


def _full_logprob(model, context: list[int], continuation: list[int], max_length: int = 32) -> float:
    """log p(continuation | context) from one plain forward pass over both, the context cut from the left to fit
    max_length (block_size) as lm_eval's Hugging Face model cuts it."""
    ids = (context + continuation)[-(max_length + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)  # (T, V)
    n = len(continuation)
    return sum(float(logp[len(ids) - 1 - n + i, t]) for i, t in enumerate(continuation))


def test_multiple_choice_loglikelihoods_equal_the_models_own(run):
    model, tok, samples = run
    seen = 0
    for sample in samples["mm_choice"]:
        doc = DOCS[sample["doc_id"]]
        for (context, continuation), choice, resp in zip(sample["arguments"], doc["choices"], sample["resps"]):
            assert (context, continuation) == (doc["question"], " " + choice)  # lm_eval's target delimiter
            expected = _full_logprob(model, tok.encode(context), tok.encode(continuation))
            assert resp[0][0] == pytest.approx(expected, abs=1e-5)
            seen += 1
    assert seen == 8


def test_rolling_loglikelihood_equals_the_models_own_over_windows(run):
    model, tok, samples = run
    for sample in samples["mm_rolling"]:
        text = tok.encode(DOCS[sample["doc_id"]]["question"])
        newline = tok.encode("\n")
        # block_size 32 and every question is shorter: one window conditioned on the prefix token
        assert len(text) <= 32
        assert sample["resps"][0][0] == pytest.approx(_full_logprob(model, newline, text), abs=1e-5)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(run):
    model, tok, samples = run
    for sample in samples["mm_gen"]:
        prompt = tok.encode(DOCS[sample["doc_id"]]["question"])
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, temperature=0.0)[0, len(prompt):].tolist()
        expected = tok.decode(out).split("e")[0]
        assert sample["resps"][0][0] == expected
