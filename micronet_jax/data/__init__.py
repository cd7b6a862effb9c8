"""CIFAR data and its augmentation: archives and downloads, the AutoAugment ops and policy,
crop / flip / normalise / mixup on the device."""
