"""Evaluations beyond the loss: synthetic recall tasks (MQAR, passkey retrieval), the recall benchmark behind
`minimax-gpt recall`, and the lm-evaluation-harness adapter (`evals.harness`, needs the `eval` extra)."""
