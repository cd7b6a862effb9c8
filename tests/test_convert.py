"""Loading the original's released PyTorch checkpoints without torch.

Values are checked against torch.load when torch is installed, and always against a minimal
decoding of the legacy file written here (pickletools + struct, not the package's reader).
The converted first submission must recognise real CIFAR-10 automobiles as CIFAR-100 vehicles.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import pickletools
import struct
import tarfile
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from micronet_jax.data.augment import CIFAR100_MEAN, CIFAR100_STD
from micronet_jax.errors import CheckpointError
from micronet_jax.models.architecture import build_architecture
from micronet_jax.models.torch_import import (
    convert_state_dict,
    infer_exit_block,
    load_original,
    validate_state_dict,
)
from micronet_jax.models.torch_pickle import load_state_dict, load_torch_file

pytestmark = pytest.mark.shared

NAMES = ("first_submission", "final_ee50")
MAIN_WEIGHTS = 467_824  # published
MAIN_ZEROS = 299_407  # published
EXIT_WEIGHTS = 432 + 6_528 + 13_600  # 48·3·3 + 48·136 + 136·100
EXIT_THRESHOLD = 0.85
BATCH = 250

# The standard CIFAR-100 fine label names, in label order (alphabetical).
CIFAR100_FINE = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house "
    "kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle "
    "mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew "
    "skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank "
    "telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf "
    "woman worm"
).split()
VEHICLES = (
    "bicycle bus motorcycle pickup_truck train lawn_mower rocket streetcar tank tractor".split()
)
CIFAR10_AUTOMOBILE = 1


# ---------------------------------------------------------------- independent decoding


@dataclasses.dataclass
class RawLegacy:
    """A legacy torch.save file taken apart with pickletools and struct only."""

    main_pickle: bytes
    storage_of: dict[str, tuple[str, str]]  # tensor name -> (storage key, storage type)
    storage_bytes: dict[str, bytes]  # storage key -> raw element bytes

    def flat(self, name: str) -> np.ndarray:
        key, storage_type = self.storage_of[name]
        dtype = "<i8" if storage_type == "torch LongStorage" else "<f4"
        return np.frombuffer(self.storage_bytes[key], dtype)


def _pickle_end(data: bytes, start: int) -> int:
    for op, _arg, pos in pickletools.genops(data[start:]):
        if op.name == "STOP":
            return start + pos + 1
    raise AssertionError("no STOP opcode")


def _tensor_storages(main: bytes) -> dict[str, tuple[str, str]]:
    """Tensor name -> storage key, by following the string values through the pickle memo."""
    memo: dict[int, object] = {}
    found: dict[str, tuple[str, str]] = {}
    value: object = None
    name = storage_type = None
    for op, arg, _pos in pickletools.genops(main):
        if op.name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = value
            continue
        value = memo.get(arg) if op.name in ("BINGET", "LONG_BINGET") else arg
        if not isinstance(value, str):
            continue
        if value.startswith("torch ") and value.endswith("Storage"):
            storage_type = value
        elif value.startswith("_"):
            name = value
        elif value.isdigit() and name is not None:
            found[name] = (value, storage_type)
            name = None
    return found


def decode_legacy(path: Path) -> RawLegacy:
    data = path.read_bytes()
    ends = [0]
    for _ in range(5):  # magic, protocol, sys info, state dict, storage keys
        ends.append(_pickle_end(data, ends[-1]))
    main = data[ends[3] : ends[4]]
    storage_of = _tensor_storages(main)
    types = dict(storage_of.values())
    keys = pickle.loads(data[ends[4] : ends[5]])  # a plain list of str
    pos, storage_bytes = ends[5], {}
    for key in keys:
        (count,) = struct.unpack_from("<q", data, pos)
        size = count * (8 if types[key] == "torch LongStorage" else 4)
        storage_bytes[key] = data[pos + 8 : pos + 8 + size]
        pos += 8 + size
    assert pos == len(data)
    return RawLegacy(main, storage_of, storage_bytes)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def paths(original_checkpoints: Path) -> dict[str, Path]:
    return {name: original_checkpoints / name / "trained_model.pth" for name in NAMES}


@pytest.fixture(scope="module")
def state_dicts(paths) -> dict[str, dict[str, np.ndarray]]:
    return {name: load_state_dict(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def converted(paths):
    return {name: load_original(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def apply_fn(converted):
    """One jitted eval-mode apply, shared by every test (both checkpoints share a model)."""
    model = converted["first_submission"].model
    return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


@pytest.fixture(scope="module")
def automobiles(cifar10_archive: Path) -> np.ndarray:
    """The 1,000 real CIFAR-10 test automobiles, normalised as the original normalises."""
    with tarfile.open(cifar10_archive) as tar:
        member = tar.extractfile("cifar-10-batches-py/test_batch")
        batch = pickle.load(member, encoding="bytes")
    labels = np.asarray(batch[b"labels"])
    images = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    cars = images[labels == CIFAR10_AUTOMOBILE] / 255.0
    return ((cars - np.array(CIFAR100_MEAN)) / np.array(CIFAR100_STD)).astype(np.float32)


@pytest.fixture(scope="module")
def car_logits(converted, apply_fn, automobiles):
    variables = converted["first_submission"].variables
    outputs = [apply_fn(variables, automobiles[i : i + BATCH]) for i in range(0, 1000, BATCH)]
    main = np.concatenate([np.asarray(m) for m, _ in outputs])
    exit_ = np.concatenate([np.asarray(e) for _, e in outputs])
    return main, exit_


def _kernels(params, exit_head: bool) -> list[np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return [
        np.asarray(leaf)
        for path, leaf in leaves
        if path[-1].key == "kernel" and (path[0].key == "exit_head") == exit_head
    ]


# ---------------------------------------------------------------- the real checkpoints


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_holds_the_original_state_dict(state_dicts, name):
    sd = state_dicts[name]
    assert sd["_conv_stem.weight"].shape == (24, 3, 3, 3)
    assert sd["_exit._fc.weight"].shape == (100, 136, 1, 1)
    assert sd["_blocks.9._bn2.running_mean"].shape == (4 * 96,)
    assert sd["_bn0.num_batches_tracked"].dtype == np.int64
    assert sd["_fc.weight"].dtype == np.float32
    masks = {key for key in sd if key.endswith(".mask")}
    expected_masks = {f"_exit._{m}.mask" for m in ("depthwise_conv", "expand_conv", "fc")}
    assert masks == (expected_masks if name == "final_ee50" else set())


@pytest.mark.parametrize("name", NAMES)
def test_main_network_is_64_percent_zeros(converted, name):
    checkpoint = converted[name]
    kernels = _kernels(checkpoint.variables["params"], exit_head=False)
    assert sum(k.size for k in kernels) == MAIN_WEIGHTS
    assert sum(int(np.sum(k == 0)) for k in kernels) == MAIN_ZEROS
    masks = _kernels(checkpoint.masks, exit_head=False)
    assert sum(int(np.sum(m == 0)) for m in masks) == MAIN_ZEROS
    for path, mask in jax.tree_util.tree_leaves_with_path(checkpoint.masks):
        if path[-1].key != "kernel":
            assert np.all(np.asarray(mask) == 1.0), path


def test_exit_head_is_dense_then_half_pruned(converted):
    def zero_share(name: str) -> float:
        kernels = _kernels(converted[name].variables["params"], exit_head=True)
        assert sum(k.size for k in kernels) == EXIT_WEIGHTS
        return sum(int(np.sum(k == 0)) for k in kernels) / EXIT_WEIGHTS

    assert zero_share("first_submission") < 0.01
    assert abs(zero_share("final_ee50") - 0.5) < 0.01


def test_saved_exit_masks_match_the_derived_masks(converted, state_dicts):
    sd, masks = state_dicts["final_ee50"], converted["final_ee50"].masks["exit_head"]
    dw = sd["_exit._depthwise_conv.mask"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(masks["depthwise_conv"]["kernel"]), dw)
    expand = sd["_exit._expand_conv.mask"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(masks["expand_conv"]["kernel"]), expand)
    fc = sd["_exit._fc.mask"][:, :, 0, 0].T
    np.testing.assert_array_equal(np.asarray(masks["fc"]["kernel"]), fc)


@pytest.mark.parametrize("name", NAMES)
def test_variables_match_the_model_exactly(converted, name):
    checkpoint = converted[name]
    assert checkpoint.arch.exit_head is not None
    assert checkpoint.arch.exit_head.after_block == 4
    x = jax.ShapeDtypeStruct((4, 32, 32, 3), np.float32)
    expected = jax.eval_shape(
        lambda key, x: checkpoint.model.init({"params": key}, x, train=False),
        jax.random.key(0),
        x,
    )
    expected = jax.tree.map(lambda a: (a.shape, a.dtype), dict(expected))
    found = jax.tree.map(lambda a: (a.shape, a.dtype), checkpoint.variables)
    assert found == expected
    assert jax.tree.map(lambda a: (a.shape, a.dtype), checkpoint.masks) == expected["params"]


def test_info_is_the_original_model_info(converted):
    # the checkpoints record 79.92% and 80.26%.
    assert converted["first_submission"].info["performance"]["accuracy"] == pytest.approx(0.7992)
    assert converted["final_ee50"].info["performance"]["accuracy"] == pytest.approx(0.8026)


# ---------------------------------------------------------------- values, decoded independently


@pytest.mark.parametrize("name", NAMES)
def test_reader_matches_a_raw_decoding(paths, state_dicts, name):
    raw = decode_legacy(paths[name])
    sd = state_dicts[name]
    assert set(raw.storage_of) == set(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(raw.flat(key), value.ravel(), err_msg=key)


def test_conversion_transposes_raw_values(paths, converted):
    raw = decode_legacy(paths["first_submission"])
    params = converted["first_submission"].variables["params"]
    stats = converted["first_submission"].variables["batch_stats"]
    stem = raw.flat("_conv_stem.weight").reshape(24, 3, 3, 3)  # O, I, kH, kW
    kernel = np.asarray(params["stem_conv"]["kernel"])
    assert kernel[1, 2, 0, 5] == stem[5, 0, 1, 2]
    np.testing.assert_array_equal(kernel, stem.transpose(2, 3, 1, 0))
    depthwise = raw.flat("_blocks.4._conv.weight").reshape(240, 1, 3, 3)
    kernel = np.asarray(params["blocks_4"]["depthwise_conv"]["kernel"])
    assert kernel.shape == (3, 3, 1, 240) and kernel[0, 2, 0, 17] == depthwise[17, 0, 0, 2]
    fc = raw.flat("_fc.weight").reshape(100, 136)
    np.testing.assert_array_equal(np.asarray(params["fc"]["kernel"]), fc.T)
    exit_fc = raw.flat("_exit._fc.weight").reshape(100, 136)
    np.testing.assert_array_equal(np.asarray(params["exit_head"]["fc"]["kernel"]), exit_fc.T)
    mean = raw.flat("_blocks.9._bn2.running_mean").reshape(4, 96)
    np.testing.assert_array_equal(np.asarray(stats["blocks_9"]["bn2"]["mean"]), mean[0])
    scale = raw.flat("_exit._bn1.weight")
    np.testing.assert_array_equal(np.asarray(params["exit_head"]["bn1"]["scale"]), scale)


def test_zip_format_reads_the_same_tensors(tmp_path, paths, state_dicts):
    raw = decode_legacy(paths["first_submission"])
    archive = tmp_path / "zipped.pth"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("zipped/data.pkl", raw.main_pickle)
        zf.writestr("zipped/byteorder", "little")
        for key, data in raw.storage_bytes.items():
            zf.writestr(f"zipped/data/{key}", data)
    loaded = load_state_dict(archive)
    assert list(loaded) == list(state_dicts["first_submission"])
    for key, value in state_dicts["first_submission"].items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


# ---------------------------------------------------------------- values, read by torch


_TOP_MODULES = {
    "_conv_stem": "stem_conv",
    "_bn0": "stem_bn",
    "_conv_head": "head_conv",
    "_bn1": "head_bn",
    "_fc": "fc",
}
_BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _flax_path(key: str) -> tuple[str, ...]:
    """Where a torch key should land, written out independently of the converter."""
    *modules, leaf = key.split(".")
    if modules[0] == "_blocks":
        inner = "depthwise_conv" if modules[2] == "_conv" else modules[2][1:]
        path = [f"blocks_{modules[1]}", inner]
    elif modules[0] == "_exit":
        path = ["exit_head", modules[1][1:]]
    else:
        path = [_TOP_MODULES[modules[0]]]
    if path[-1] in ("stem_bn", "head_bn") or path[-1].startswith("bn"):
        collection = "batch_stats" if leaf.startswith("running") else "params"
        return (collection, *path, _BN_LEAVES[leaf])
    return ("params", *path, {"weight": "kernel", "bias": "bias"}[leaf])


@pytest.mark.parametrize("name", NAMES)
def test_every_tensor_matches_torch_load(paths, state_dicts, converted, name):
    torch = pytest.importorskip("torch")
    reference = torch.load(paths[name], map_location="cpu", weights_only=True)
    sd, variables = state_dicts[name], converted[name].variables
    assert list(sd) == list(reference)
    used = 0
    for key, tensor in reference.items():
        value = tensor.numpy()
        assert sd[key].dtype == value.dtype and sd[key].shape == value.shape, key
        np.testing.assert_array_equal(sd[key], value, err_msg=key)
        if key.endswith((".mask", ".num_batches_tracked")):
            continue
        leaf = variables
        for part in _flax_path(key):
            leaf = leaf[part]
        if key == "_exit._fc.weight":
            expected = tensor[:, :, 0, 0].T.numpy()
        elif tensor.ndim == 4:
            expected = tensor.permute(2, 3, 1, 0).numpy()
        elif tensor.ndim == 2:
            expected = tensor.T.numpy()
        elif key.endswith(("running_mean", "running_var")):
            splits = tensor.view(4, -1)
            assert torch.equal(splits, splits[:1].expand(4, -1)), f"{key}: splits differ"
            expected = splits[0].numpy()
        else:
            expected = value
        np.testing.assert_array_equal(np.asarray(leaf), expected, err_msg=key)
        used += 1
    assert used == len(jax.tree.leaves(variables))


def test_torch_saved_files_of_every_layout(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    tensors = {
        "transposed": base.transpose(0, 2),
        "sliced": base[1:, 2:, ::2],
        "half": torch.linspace(-2, 2, 6).half().reshape(3, 2),
        "bfloat16": torch.linspace(-3, 3, 7).bfloat16(),
        "int32": torch.arange(5, dtype=torch.int32),
        "bool": torch.tensor([True, False]),
        "uint8": torch.arange(4, dtype=torch.uint8),
        "float64": torch.linspace(0, 1, 4, dtype=torch.float64).reshape(2, 2),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "shared": base,
    }
    for zipped in (True, False):
        path = tmp_path / f"t{zipped}.pt"
        torch.save(dict(tensors), path, _use_new_zipfile_serialization=zipped)
        loaded = load_state_dict(path)
        for key, tensor in tensors.items():
            expected = (tensor.float() if key == "bfloat16" else tensor).numpy()
            assert loaded[key].dtype == expected.dtype, key
            np.testing.assert_array_equal(loaded[key], expected, err_msg=key)
    path = tmp_path / "nested.pt"
    torch.save({"epoch": 3, "items": [torch.ones(2), ("a", None)]}, path)
    nested = load_torch_file(path)
    assert nested["epoch"] == 3 and nested["items"][1] == ("a", None)
    np.testing.assert_array_equal(nested["items"][0], np.ones(2, np.float32))


def _torch_forward(torch, sd, x):
    """The original network written directly in torch.nn.functional."""
    functional = torch.nn.functional

    def bn(h, prefix):
        c = sd[prefix + ".weight"].numel()
        mean, var = sd[prefix + ".running_mean"][:c], sd[prefix + ".running_var"][:c]
        return functional.batch_norm(
            h, mean, var, sd[prefix + ".weight"], sd[prefix + ".bias"], False, 0.0, 1e-5
        )

    def swish(h):
        return h * torch.sigmoid(h)

    def conv(h, weight, stride=1, groups=1, bias=None):
        if weight.shape[-1] == 3:
            h = functional.pad(h, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))
        return functional.conv2d(h, weight, bias, stride, 0, 1, groups)

    strides = (1, 1, 2, 1, 1, 1, 1, 2, 1, 1)
    h = functional.interpolate(x, size=63, mode="nearest")
    h = swish(bn(conv(h, sd["_conv_stem.weight"], 2), "_bn0"))
    exit_logits = None
    for i, stride in enumerate(strides):
        p, block_input = f"_blocks.{i}.", h
        if p + "_expand_conv.weight" in sd:
            h = swish(bn(conv(h, sd[p + "_expand_conv.weight"]), p + "_bn0"))
        w = sd[p + "_conv.weight"]
        h = swish(bn(conv(h, w, stride, w.shape[0]), p + "_bn1"))
        s = h.mean((2, 3), keepdim=True)
        s = swish(conv(s, sd[p + "_se_reduce.weight"], bias=sd[p + "_se_reduce.bias"]))
        h = h * torch.sigmoid(conv(s, sd[p + "_se_expand.weight"], bias=sd[p + "_se_expand.bias"]))
        h = bn(conv(h, sd[p + "_project_conv.weight"]), p + "_bn2")
        if stride == 1 and h.shape == block_input.shape:
            h = h + block_input
        if i == 4:
            w = sd["_exit._depthwise_conv.weight"]
            e = swish(bn(conv(h, w, 1, w.shape[0]), "_exit._bn0"))
            e = swish(bn(conv(e, sd["_exit._expand_conv.weight"]), "_exit._bn1"))
            e = e.mean((2, 3), keepdim=True)
            exit_logits = conv(e, sd["_exit._fc.weight"], bias=sd["_exit._fc.bias"]).flatten(1)
    h = swish(bn(conv(h, sd["_conv_head.weight"]), "_bn1")).mean((2, 3))
    return functional.linear(h, sd["_fc.weight"], sd["_fc.bias"]), exit_logits


@pytest.mark.slow
def test_converted_model_matches_a_torch_forward(paths, converted, apply_fn, automobiles):
    torch = pytest.importorskip("torch")
    sd = torch.load(paths["final_ee50"], map_location="cpu", weights_only=True)
    x = automobiles[:BATCH]
    with torch.no_grad():
        main, exit_ = _torch_forward(torch, sd, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    ours_main, ours_exit = apply_fn(converted["final_ee50"].variables, x)
    np.testing.assert_allclose(np.asarray(ours_main), main.numpy(), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(ours_exit), exit_.numpy(), atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------- real data


def test_label_names_are_the_cifar100_order():
    assert len(CIFAR100_FINE) == 100 and list(CIFAR100_FINE) == sorted(CIFAR100_FINE)
    indices = sorted(CIFAR100_FINE.index(name) for name in VEHICLES)
    assert indices == [8, 13, 41, 48, 58, 69, 81, 85, 89, 90]


@pytest.mark.slow
def test_automobiles_are_recognised_as_vehicles(car_logits):
    main, exit_ = car_logits
    assert main.shape == exit_.shape == (1000, 100)
    assert np.all(np.isfinite(main)) and np.all(np.isfinite(exit_))
    vehicles = [CIFAR100_FINE.index(name) for name in VEHICLES]
    main_share = np.isin(main.argmax(1), vehicles).mean()
    exit_share = np.isin(exit_.argmax(1), vehicles).mean()
    confidence = np.asarray(jax.nn.softmax(exit_, axis=-1)).max(axis=1)
    exit_ratio = (confidence > EXIT_THRESHOLD).mean()
    summary = f"main {main_share:.3f}, exit head {exit_share:.3f}, exit ratio {exit_ratio:.3f}"
    assert main_share >= 0.70, summary
    assert exit_share >= 0.50, summary  # the weaker exit head still sees vehicles


# ---------------------------------------------------------------- bad inputs


def test_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello, these are not weights\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_original(text)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="not a torch.save file"):
        load_state_dict(plain)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_original(tmp_path / "absent.pth")


@pytest.mark.parametrize("keep", [8, 5_000, 1_000_000, -1])
def test_refuses_a_truncated_file(tmp_path, paths, keep):
    data = paths["first_submission"].read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="truncated"):
        load_original(cut)


def test_refuses_a_truncated_zip(tmp_path, paths):
    raw = decode_legacy(paths["first_submission"])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("a/data.pkl", raw.main_pickle)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(buffer.getvalue()[:-40])
    with pytest.raises(CheckpointError, match="truncated or damaged zip"):
        load_state_dict(cut)


def test_refuses_an_unsupported_dtype(tmp_path, paths):
    data = paths["first_submission"].read_bytes()
    quantised = data.replace(b"ctorch\nLongStorage\n", b"ctorch\nQInt8Storage\n")
    assert quantised != data
    bad = tmp_path / "q.pth"
    bad.write_bytes(quantised)
    with pytest.raises(CheckpointError, match=r"unsupported tensor dtype: torch\.QInt8Storage"):
        load_state_dict(bad)


def test_refuses_to_run_code_from_a_checkpoint(tmp_path, paths):
    data = paths["first_submission"].read_bytes()
    hostile = data.replace(b"ccollections\nOrderedDict\n", b"cos\nsystem\n", 1)
    bad = tmp_path / "hostile.pth"
    bad.write_bytes(hostile)
    with pytest.raises(CheckpointError, match=r"refusing to load os\.system"):
        load_state_dict(bad)


@pytest.fixture
def arch():
    return build_architecture(exit_block=4)


def test_refuses_a_missing_key(state_dicts, arch):
    sd = dict(state_dicts["first_submission"])
    del sd["_blocks.3._se_expand.bias"]
    with pytest.raises(CheckpointError, match=r"lacks '_blocks\.3\._se_expand\.bias'.*\(240,\)"):
        convert_state_dict(sd, arch)


def test_refuses_a_wrong_shape(state_dicts, arch):
    sd = dict(state_dicts["first_submission"])
    sd["_fc.weight"] = sd["_fc.weight"].T
    message = r"'_fc\.weight' has shape \(136, 100\), expected \(100, 136\)"
    with pytest.raises(CheckpointError, match=message):
        convert_state_dict(sd, arch)


def test_refuses_unexpected_keys(state_dicts, arch):
    sd = dict(state_dicts["first_submission"])
    sd["_blocks.10._conv.weight"] = np.zeros((96, 1, 3, 3), np.float32)
    sd["extra"] = np.zeros(3, np.float32)
    with pytest.raises(
        CheckpointError, match=r"unexpected keys: _blocks\.10\._conv\.weight, extra"
    ):
        convert_state_dict(sd, arch)


def test_refuses_a_mask_that_hides_live_weights(state_dicts, arch):
    sd = dict(state_dicts["final_ee50"])
    sd["_exit._fc.mask"] = np.zeros_like(sd["_exit._fc.mask"])
    with pytest.raises(CheckpointError, match=r"'_exit\._fc\.mask' masks weights"):
        validate_state_dict(sd, arch)


def test_refuses_an_exit_head_at_the_wrong_block(paths, state_dicts):
    message = (
        r"'_exit\._depthwise_conv\.weight' has shape \(48, 1, 3, 3\), expected \(40, 1, 3, 3\)"
    )
    with pytest.raises(CheckpointError, match=message):
        convert_state_dict(state_dicts["first_submission"], build_architecture(exit_block=3))
    with pytest.raises(CheckpointError, match="exit block must be in"):
        load_original(paths["first_submission"], exit_block=9)


# ---------------------------------------------------------------- exit block inference


def test_exit_block_inference(state_dicts):
    arch = build_architecture()
    sd = state_dicts["first_submission"]
    assert infer_exit_block(sd, arch) == 4
    assert infer_exit_block(sd, arch, {"exit_block": 3}) == 3
    main_only = {k: v for k, v in sd.items() if not k.startswith("_exit.")}
    assert infer_exit_block(main_only, arch) is None
    assert "exit_head" not in convert_state_dict(main_only, arch)["params"]

    def exit_with(channels: int) -> dict[str, np.ndarray]:
        return {"_exit._depthwise_conv.weight": np.zeros((channels, 1, 3, 3), np.float32)}

    assert infer_exit_block(exit_with(16), arch) == 0  # only block 0 outputs 16 channels
    with pytest.raises(CheckpointError, match=r"fit blocks \[5, 6\]"):
        infer_exit_block(exit_with(64), arch)
