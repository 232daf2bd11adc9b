"""One module per mode (pipeline, sft, grpo, evaluate, inspect_model) and the experiment
assembly they share (experiment.py). r1jax/main.py maps mode names to these."""
