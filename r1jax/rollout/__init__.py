"""Rollouts: the sampler and the one cached prefill/decode path (over model/'s block)."""
