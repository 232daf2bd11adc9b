"""The DeepSeek-V3 architecture (and the dense Qwen2 / Llama family) as pure functions over pytrees.

config (fields, validation), presets (released shapes and tiny twins), layers (RMSNorm,
SwiGLU, parameter specs), rope (RoPE, YaRN, Llama-3 scaling), mla (Multi-head Latent
Attention), gqa (grouped-query attention, attention_type='gqa'), moe (router and dispatch
registry), moe_pallas (the 'pallas' dispatch over pallas_kernels), decoder
(parameters, the block, forward, MTP, counts), hf (HF checkpoint I/O). Nothing here imports
from r1jax outside r1jax/model/ (pallas_kernels is a separate package).
"""
