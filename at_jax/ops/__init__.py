"""Ops below the models: the attention-distillation cross-entropy (`attn_ce`; its tile math in
`attn_ce_tiles`, its Pallas kernels in `attn_ce_pallas`)."""
