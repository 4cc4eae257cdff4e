"""The recall benchmark: a budget from data, results per layout and length written as JSON and a plot, and the
`minimax-gpt recall` command (both modes) on tiny budgets."""

import json

import pytest
import torch

from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig
from minimax_gpt.__main__ import main
from minimax_gpt.data.tokenizer import build_tokenizer
from minimax_gpt.evals.mqar_training import MQARRecipe
from minimax_gpt.evals.recall import RecallBudget, format_table, load_budget, make_budget, run_recall
from minimax_gpt.training.checkpoint import save_checkpoint

L, S = "lightning", "softmax"
TINY = dict(layouts={"mixed": [L, S], "linear": [L, L]}, seq_lens=(16, 24), n_pairs=2, seeds=(0, 1), n_layer=2,
            n_embd=16, n_head=2, n_keys=4, n_values=4, eval_sequences=8,
            recipe=MQARRecipe(steps=3, batch_size=4, warmup_steps=1))


def test_the_packaged_budget_compares_the_four_layouts_at_equal_width_and_depth():
    budget = RecallBudget()
    assert list(budget.layouts) == ["softmax", "lightning", "hybrid-7-1", "hybrid-3-1"]
    configs = [budget.model_config(types) for types in budget.layouts.values()]
    assert {(c.n_layer, c.n_embd, c.n_head) for c in configs} == {(8, 64, 2)}
    assert budget.layouts["hybrid-7-1"] == [L] * 7 + [S]


def test_run_writes_every_layout_length_and_seed(tmp_path):
    seen = []
    results = run_recall(RecallBudget(**TINY), tmp_path, on_result=lambda *r: seen.append(r[:3]))
    assert seen == [(n, T, s) for n in ("mixed", "linear") for T in (16, 24) for s in (0, 1)]
    saved = json.loads((tmp_path / "recall.json").read_text())
    assert saved == json.loads(json.dumps(results)) and saved["complete"]
    row = saved["layouts"]["mixed"]["lengths"]["24"]
    assert row["n_pairs"] == 2 and len(row["accuracy"]) == 2
    assert row["mean"] == pytest.approx(sum(row["accuracy"]) / 2)
    assert row["std"] == pytest.approx(abs(row["accuracy"][0] - row["accuracy"][1]) / 2 ** 0.5)
    assert all(a * 16 == round(a * 16) for a in row["accuracy"])  # 8 sequences x 2 queries
    assert (tmp_path / "recall.png").stat().st_size > 1000
    assert format_table(saved).splitlines()[0].split() == ["layout", "params", "T=16", "T=24"]


def test_same_budget_same_results(tmp_path):
    a = run_recall(RecallBudget(**{**TINY, "seeds": (3,)}), tmp_path / "a")
    b = run_recall(RecallBudget(**{**TINY, "seeds": (3,)}), tmp_path / "b")
    assert a["layouts"] == b["layouts"]


def test_budget_from_toml_adds_named_layouts_and_refuses_unknown_keys(tmp_path):
    good = tmp_path / "b.toml"
    good.write_text('seq_lens = [32]\nn_layer = 8\n[recipe]\nsteps = 7\nwarmup_steps = 1\n'
                    '[layouts]\nfirst = ["softmax", "lightning", "lightning", "lightning", "lightning", "lightning", '
                    '"lightning", "lightning"]\n')
    budget = load_budget(good)
    assert budget.recipe.steps == 7 and budget.seq_lens == (32,)
    assert list(budget.layouts) == ["softmax", "lightning", "hybrid-7-1", "hybrid-3-1", "first"]
    (tmp_path / "bad.toml").write_text("seq_len = [32]\n")
    with pytest.raises(ValueError, match="unknown recall budget key.s. seq_len"):
        load_budget(tmp_path / "bad.toml")
    (tmp_path / "bad2.toml").write_text("[recipe]\nlearning_rate = 1\n")
    with pytest.raises(ValueError, match=r"unknown \[recipe\] key.s. learning_rate"):
        load_budget(tmp_path / "bad2.toml")


def test_command_line_choices_make_the_budget():
    budget = make_budget(layouts=["softmax", "mine"], extra_layouts=["mine=" + ",".join([L] * 6 + [S] * 2)],
                         seq_lens=(64,), seeds=(0, 1, 2), steps=300)
    assert list(budget.layouts) == ["softmax", "mine"] and budget.layouts["mine"][-1] == S
    assert budget.seeds == (0, 1, 2) and budget.recipe.steps == 300
    assert budget.recipe.warmup_steps == round(RecallBudget().recipe.warmup_steps * 300 / RecallBudget().recipe.steps)
    with pytest.raises(ValueError, match="--layouts names nope"):
        make_budget(layouts=["nope"])
    with pytest.raises(ValueError, match="--layout must be NAME=TYPE"):
        make_budget(extra_layouts=["lightning,softmax"])
    with pytest.raises(ValueError, match="seq_len .16. must be >= 3 \\* n_pairs .18."):
        make_budget(seq_lens=(16,), n_pairs=6)


def test_recall_command_runs_a_budget_file(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text('seq_lens = [16]\nseeds = [0]\nn_layer = 2\nn_embd = 16\nn_pairs = 2\nn_keys = 4\n'
                      'n_values = 4\neval_sequences = 4\n[recipe]\nsteps = 2\nbatch_size = 2\nwarmup_steps = 0\n'
                      '[layouts]\nsoftmax = ["softmax", "softmax"]\nlightning = ["lightning", "lightning"]\n'
                      'hybrid-7-1 = ["lightning", "softmax"]\nhybrid-3-1 = ["lightning", "softmax"]\n')
    assert main(["recall", "--config", str(config), "--out", str(tmp_path / "out"), "--layouts",
                 "softmax,lightning"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["layout", "params", "T=16"] and "recall.json" in out
    assert set(json.loads((tmp_path / "out" / "recall.json").read_text())["layouts"]) == {"softmax", "lightning"}
    assert main(["recall", "--config", str(config), "--out", str(tmp_path / "staged"), "--layouts", "softmax",
                 "--seq-lens", "12,16", "--stage-steps", "1", "--save-models"]) == 0
    staged = json.loads((tmp_path / "staged" / "recall.json").read_text())
    assert staged["budget"]["stage_steps"] == 1 and len(staged["layouts"]["softmax"]["lengths"]["16"]["zero_shot"]) == 1
    assert sorted(p.name for p in (tmp_path / "staged" / "models").iterdir()) == ["softmax-seed0-T12",
                                                                                  "softmax-seed0-T16"]
    assert main(["recall", "--seeds", "x"]) == 2
    assert "expected comma-separated integers, got 'x'" in capsys.readouterr().err


def test_recall_command_with_a_checkpoint_measures_passkeys_at_1_2_4_times_its_length(tmp_path, capsys):
    torch.manual_seed(0)
    config = MiniMaxConfig(vocab_size=256, block_size=128, n_layer=2, n_head=2, n_embd=16, lightning_chunk_size=16,
                           layer_types=[L, S])
    save_checkpoint(tmp_path / "ckpt", EnhancedMiniMaxGPT(config), build_tokenizer("bytes"))
    assert main(["recall", "--checkpoint", str(tmp_path / "ckpt"), "--trials", "1", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["training_length"] == 128 and list(r["lengths"]) == ["128", "256", "512"]
    assert all(0 <= row["accuracy"] <= 1 and row["tokens"] <= int(n) for n, row in r["lengths"].items())


def test_a_shallow_budget_names_only_the_layouts_it_can_build(tmp_path):
    config = tmp_path / "two.toml"
    config.write_text('n_layer = 2\nseq_lens = [32]\n[layouts]\nhybrid-1-1 = ["lightning", "softmax"]\n')
    budget = make_budget(config, ["softmax", "hybrid-1-1"])
    assert budget.layouts == {"softmax": [S, S], "hybrid-1-1": [L, S]}
    with pytest.raises(ValueError, match="7:1 hybrid needs n_layer to be a multiple of 8, got 2"):
        make_budget(config)  # all built-in layouts, at a depth where 7:1 cannot exist


def test_conv_and_sparse_layouts_get_their_model_settings(tmp_path):
    budget = make_budget(layouts=["softmax", "hybrid-7-1-conv", "sparse-7-1"], seq_lens=(64,))
    assert budget.short_conv == {"softmax": 0, "hybrid-7-1-conv": 4, "sparse-7-1": 0}
    conv = budget.model_config(budget.layouts["hybrid-7-1-conv"], budget.short_conv["hybrid-7-1-conv"])
    sparse = budget.model_config(budget.layouts["sparse-7-1"])
    assert conv.short_conv == 4 and conv.layer_types == [L] * 7 + [S]
    assert sparse.layer_types[-1] == "sparse" and (sparse.sparse_block_size, sparse.sparse_top_k) == (8, 2)
    with pytest.raises(ValueError, match="layout 'softmax-conv': short_conv=4 applies to lightning layers"):
        make_budget(layouts=["softmax-conv"])
    config = tmp_path / "conv.toml"
    config.write_text('n_layer = 2\nseq_lens = [16]\nn_pairs = 2\nn_keys = 4\nn_values = 4\neval_sequences = 4\n'
                      'seeds = [0]\nsparse_top_k = 1\n[recipe]\nsteps = 2\nbatch_size = 2\nwarmup_steps = 0\n'
                      '[layouts]\nmixed = ["lightning", "softmax"]\nmixed-k3 = ["lightning", "softmax"]\n'
                      '[short_conv]\nmixed-k3 = 3\n')
    budget = make_budget(config, ["mixed", "mixed-k3"])
    assert budget.short_conv == {"mixed": 0, "mixed-k3": 3} and budget.sparse_top_k == 1
    results = run_recall(budget, tmp_path / "out")
    plain, conv = results["layouts"]["mixed"], results["layouts"]["mixed-k3"]
    assert (plain["short_conv"], conv["short_conv"]) == (0, 3)
    assert conv["params"] - plain["params"] == 3 * 64 * 3  # one lightning layer: (3 * H * D = 3 * 64) x K weights
    (tmp_path / "bad.toml").write_text('n_layer = 2\nseq_lens = [16]\nn_pairs = 2\n[layouts]\n'
                                       'mixed = ["lightning", "softmax"]\n[short_conv]\nother = 4\n')
    with pytest.raises(ValueError, match="short_conv names layout.s. other"):
        make_budget(tmp_path / "bad.toml", ["mixed"])


def test_staged_extension_grows_each_seeds_model_through_the_lengths(tmp_path):
    from minimax_gpt.evals.mqar_training import train_mqar

    budget = RecallBudget(**{**TINY, "seq_lens": (24, 16), "stage_steps": 2, "save_models": True})
    steps = []
    seen = []
    staged = run_recall(budget, tmp_path / "staged", on_step=lambda: steps.append(1),
                        on_result=lambda *r: seen.append(r[:3]))
    assert seen == [(n, T, s) for n in ("mixed", "linear") for s in (0, 1) for T in (16, 24)]  # shortest first
    assert len(steps) == budget.total_steps() == 2 * 2 * (3 + 2)
    assert budget.stage_recipe() == MQARRecipe(steps=2, batch_size=4, warmup_steps=0, curriculum=0.0)
    # the shortest length is the plain recipe's run, to the last digit
    plain = run_recall(RecallBudget(**{**TINY, "seq_lens": (16,)}), tmp_path / "plain")
    for name in ("mixed", "linear"):
        assert staged["layouts"][name]["lengths"]["16"] == plain["layouts"][name]["lengths"]["16"]
        assert "zero_shot" in staged["layouts"][name]["lengths"]["24"] and \
            len(staged["layouts"][name]["lengths"]["24"]["zero_shot"]) == 2
    # the T = 24 model is the T = 16 model of the same seed trained on for stage_steps steps, on fresh batches
    models = tmp_path / "staged" / "models"
    before = EnhancedMiniMaxGPT.from_pretrained(models / "mixed-seed1-T16")
    after = EnhancedMiniMaxGPT.from_pretrained(models / "mixed-seed1-T24")
    train_mqar(before, budget.spec(24), budget.stage_recipe(), seed=1 + 7919 * 24)
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="stage_steps must be >= 1"):
        RecallBudget(**{**TINY, "stage_steps": 0})
    assert make_budget(stage_steps=300, save_models=True).total_steps() == 4 * (1200 + 300)
