"""Attention transfer: the setting (`spec`), the teacher's targets (`targets`) and the distillation
loss (`loss`)."""
