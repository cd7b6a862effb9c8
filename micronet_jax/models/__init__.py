"""The network: block args and compound scaling (the one source of truth), convolution
lowerings, layers, MicroNet and its exit head, BN folding, parameter paths, and the original's
`.pth` checkpoints read without torch."""
