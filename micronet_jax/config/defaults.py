"""The recipe's defaults: stage A, the dense baseline (1200 epochs on CIFAR-100).

Config files under `configs/` start from `default_config()` and override a few fields.
"""

from ml_collections import ConfigDict

from micronet_jax.evaluation.early_exit import DEFAULT_THRESHOLD
from micronet_jax.models.architecture import BASE_BLOCK_STRINGS
from micronet_jax.train.pruning import DEFAULT_TARGETS


def default_config() -> ConfigDict:
    config = ConfigDict()
    config.mode = "train"  # train | pipeline | test | quantize (quantize stage alone)
    config.seed = 0
    config.distributed = False  # multi-host: call jax.distributed.initialize() first
    # Seconds a multi-host process waits to join the job (exit 2 after it) and to hear from a
    # lost peer before it ends itself (exit 1); the runtime's own timeouts are set beyond it.
    config.distributed_timeout_s = 60
    config.compilation_cache = ""  # empty: ~/.cache/micronet_jax/xla; "none": off
    # On a CPU, N > 1 gives the process N CPU devices (0: one per core) and eval splits its
    # batches over them. Training is slower split that way: train/pipeline runs need
    # train.data_parallel=False with it (validate.py says so).
    config.cpu_devices = 1
    # A workdir remembers its config (config.json); a rerun with a different recipe is refused
    # unless force_restart, which moves the old contents to workdir/.old-<timestamp>/.
    config.force_restart = False

    config.model = ConfigDict()
    config.model.block_strings = BASE_BLOCK_STRINGS
    config.model.width = 0.9
    config.model.depth = 1.0
    config.model.resolution = 1.4
    config.model.head_filters = 150
    config.model.dropout = 0.2
    config.model.drop_connect = 0.2
    config.model.bn_splits = 4
    config.model.conv_impl = "auto"  # auto | xla | fast
    config.model.dtype = "float32"  # or bfloat16 (compute only; params and BN stats stay fp32)
    config.model.exit_block = 4  # where the early-exit head goes (exit stages only)
    config.model.num_classes = 0  # 0: the data set's; else e.g. 100 to fine-tune CIFAR-100's

    # Quantisation below the 16-bit freebie. Weights (per output channel, symmetric) and the
    # input of every conv/dense layer (per tensor, affine) at these widths; 32 = float32.
    # Below 16 bits, a `quantize` stage runs after the exit stages: quantisation-aware
    # training of the whole network with straight-through gradients, masks kept.
    config.quant = ConfigDict()
    config.quant.weight_bits = 32
    config.quant.activation_bits = 32
    config.quant.keep = ()  # overrides 'PREFIX=W' or 'PREFIX=W,A', e.g. ('stem_conv=8,32',)
    config.quant.epochs = 60  # the quantize stage's epochs (times pipeline.epoch_scale)
    config.quant.lr = 0.01  # its own SGD, cosine per step from this rate to 0
    config.quant.distill = False  # learn the float32 network's soft predictions, not labels
    config.quant.temperature = 1.0
    config.quant.depthwise_channels = True  # a depthwise conv's input: a grid per channel
    config.quant.freeze_bn = False  # keep BN's running statistics (fine-tuning on other data)
    config.quant.calibration_images = 1000  # training images that calibrate activation grids
    config.quant.calibration = "mse"  # mse | max
    # a width file (JSON, per-layer widths: quant.widths.save_widths, experiments.ptq's
    # search); when set it replaces weight_bits, activation_bits, keep and depthwise_channels
    config.quant.widths_file = ""
    # mode=test with widths below 16: post-training quantisation of the checkpoint by this
    # method (quant.ptq.parse_method), calibrated on calibration_images training images
    config.quant.ptq_method = "mse+bias"

    config.data = ConfigDict()
    config.data.name = "cifar100"  # cifar100 | cifar10
    config.data.dir = ""  # empty: $MICRONET_DATA or ~/.cache/micronet_jax/data
    config.data.source = "auto"  # auto | archive | tfds
    config.data.download = True
    config.data.num_train = 0  # 0: all; else the first N training images
    config.data.num_test = 0
    config.data.autoaugment = True
    config.data.policy = ""  # empty: the CIFAR-100 policy; else a JSON policy file
    config.data.mixup_alpha = 1.0

    config.train = ConfigDict()
    config.train.epochs = 1200
    config.train.batch_size = 128
    config.train.lr = 0.13
    config.train.momentum = 0.9
    config.train.weight_decay = 1e-5
    config.train.label_smoothing = 0.3
    config.train.drop_last = False  # the original's loader keeps the last partial batch
    config.train.eval_every = 10
    config.train.checkpoint_every = 10
    config.train.keep_checkpoints = 3
    config.train.eval_batch_size = 500
    config.train.progress = True
    config.train.data_parallel = True  # shard each batch over all local devices when > 1
    # Train steps run K at a time in one device program (a lax.scan); 0 = auto: 1 on a CPU,
    # 16 on a GPU or TPU. Results do not depend on it.
    config.train.steps_per_dispatch = 0
    # A step whose loss or new parameters are not finite is never applied; then
    # 'stop' ends the run with a message, 'skip' goes on (counted as skipped_steps).
    config.train.nan_policy = "stop"  # stop | skip
    config.train.nan_check_every = 10  # steps between host reads of the finiteness flags
    config.train.inject_nan_step = -1  # fault injection for tests: that global step's loss is NaN
    config.train.min_free_mb = 50  # refuse to checkpoint with less free disk (or 3x the last one)

    # The multi-stage recipe (mode=pipeline): baseline -> pruning rounds -> exit head
    # [-> exit-head pruning]. Every stage's epochs are multiplied by epoch_scale.
    config.pipeline = ConfigDict()
    config.pipeline.epoch_scale = 1.0
    config.pipeline.baseline_epochs = 1200
    config.pipeline.prune_targets = DEFAULT_TARGETS
    config.pipeline.prune_epochs = 600
    config.pipeline.rewind = False  # True: each round restarts from the baseline's init
    config.pipeline.exit_epochs = 800
    config.pipeline.exit_mixup = False  # the exit head trains without mixup
    config.pipeline.exit_autoaugment = True  # the original's code keeps it (write-up: off)
    config.pipeline.exit_prune_targets = ()  # e.g. (10, 20, 30, 40, 50): the final version
    config.pipeline.exit_prune_epochs = 600
    config.pipeline.threshold = DEFAULT_THRESHOLD  # exit when the exit head's max softmax > it

    # mode=test and mode=quantize: a finished workdir or one of the original's .pth files.
    config.checkpoint = ""
    return config
