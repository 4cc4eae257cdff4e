"""kill -9 at random moments of a run that checkpoints every step, then --resume: three trials of
benchmarks/kill_trials.py (which runs twenty per mode, FSDP too, for the numbers in the notes)."""

from benchmarks.kill_trials import run


def test_a_killed_run_resumes_from_its_last_complete_checkpoint_to_the_same_weights(tmp_path):
    rows = run(tmp_path, trials=3, modes=["none"], seed=1, phase_iters=12)
    failed = [{k: v for k, v in r.items()} for r in rows if not r["ok"]]
    assert not failed, failed
    assert all(r["from_latest"] and r["final_weights_equal"] and not r["leftover_temporaries"] for r in rows)
