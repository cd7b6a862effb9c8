"""Training one stage: state, losses, pure steps, optimizer, pruning masks, the epoch loop
with its guards, checkpoints, metrics and progress, and the quantisation-aware step."""
