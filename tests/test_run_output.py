"""What a run shows and leaves for TensorBoard: the banner, the stage bars, the event files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from tiny_run import main_env, run_main

from micronet_jax.recipe.stages import plan_stages
from micronet_jax.train.metrics import scalar_name
from micronet_jax.train.progress import StageBar, format_duration

pytest.importorskip("tensorboardX")


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in `directory`, read from the TFRecord
    framing (8-byte length, 4-byte CRC, payload, 4-byte CRC) with tensorboardX's protos."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(directory.glob("events.out.tfevents.*"))
    assert files, f"no event files in {directory}"
    for path in files:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            payload = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


EXPECTED = {"train/loss", "train/accuracy", "lr", "images_per_sec", "sparsity", "test/accuracy"}


def test_every_stage_has_tensorboard_scalars(tiny_pipeline):
    config, workdir, _ = tiny_pipeline
    for stage in plan_stages(config):
        scalars = read_scalars(workdir / stage.name)
        expected = set(EXPECTED)
        if stage.has_exit_head:
            expected |= {"test/exit_ratio", "exit_sparsity"}
        else:
            expected.add("test/loss")
        assert expected <= set(scalars), (stage.name, sorted(scalars))
        assert [step for step, _ in scalars["train/loss"]] == list(range(1, stage.epochs + 1))
        if stage.target is not None and stage.kind == "prune":
            (_, sparsity), *_ = scalars["sparsity"]
            assert sparsity == pytest.approx(stage.target / 100, abs=0.01)


def test_scalar_names_group_train_and_test():
    assert scalar_name("train_loss") == "train/loss"
    assert scalar_name("test_exit_ratio") == "test/exit_ratio"
    assert scalar_name("lr") == "lr"


def test_overall_estimate_counts_later_stages():
    """The pace from read to read, on a clock the test moves (real time would add whatever
    a loaded machine takes between the lines)."""
    now = [100.0]
    bar = StageBar(
        "stage 1/3 stage_a",
        total=100,
        later_steps=300,
        enabled=False,
        quiet=True,
        clock=lambda: now[0],
    )
    bar.advance(10, 1280)
    bar.observe({"loss": 2.0, "lr": 0.1})  # the first read includes compilation: no pace yet
    assert bar.seconds_per_step is None
    now[0] += 2.0
    bar.advance(20, 2560)
    bar.observe({"loss": 1.9, "lr": 0.1})
    assert bar.seconds_per_step == pytest.approx(0.1, rel=1e-6)
    assert bar.remaining_seconds() == pytest.approx((70 + 300) * 0.1, rel=1e-6)
    read = {"loss": 1.8, "lr": 0.1}
    now[0] += 2.0
    bar.advance(20, 2560)
    bar.observe(read)
    now[0] += 5.0
    bar.advance(1, 128)  # a dispatch returns at once, before its step has run
    bar.observe(read)  # no new read: no pace from that
    assert bar.seconds_per_step == pytest.approx(0.1, rel=1e-6)
    assert format_duration(3725) == "1:02:05"
    assert format_duration(90061) == "1d 1:01:01"


@pytest.mark.slow
def test_cli_run_explains_itself(tmp_path, tiny_archive, compile_cache):
    """A fresh run from the command line: banner, stage count, loss and lr in the bar, the
    overall estimate, one line per evaluation and per finished stage."""
    done = run_main(
        tmp_path / "run",
        tiny_archive,
        "--config.train.progress=True",
        "--config.pipeline.epoch_scale=0.0025",  # 3 epochs per stage: a pace to show
        env=main_env(compile_cache),
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for start in ("devices: ", "data: cifar10 from ", "model: ", "plan: 5 stages", "workdir: "):
        assert any(line.startswith(start) for line in out.splitlines()), (start, out[:2000])
    assert "(new run)" in out
    assert "stage_a epoch 1/3: test loss" in out
    assert "stage 5/5 exit_prune_01 done in" in out
    bar = done.stderr.replace("\r", "\n")
    for piece in ("stage 1/5 stage_a", "stage 4/5 exit", "loss=", "lr=", "img/s=", "all="):
        assert piece in bar, piece


def test_the_plan_names_every_kind_of_stage():
    import importlib.util

    from micronet_jax.recipe.banner import plan_line

    spec = importlib.util.spec_from_file_location("tiny", Path(__file__).parent / "configs/tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    config = tiny.get_config("quantized")
    config.pipeline.exit_prune_targets = (25.0,)
    line = plan_line(plan_stages(config), steps_per_epoch=3, batch_size=8, k=1)
    for label in ("baseline", "pruning round", "exit head 1", "exit pruning round", "quantisation"):
        assert label in line, line
