"""convert: safetensors -> `convrot-convert` -> Orbax checkpoint -> `load_checkpoint`.

Round trips must equal quantizing the same weights in memory bit for bit; bad inputs must fail
with one clear line and leave nothing loadable behind, also when the process is killed midway."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import flux_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert import cli
from convrot_jax import QuantPolicy
from flux_flax import FluxConfig, load_transformer, quantize_model
from flux_flax.checkpoint import load_checkpoint
from flux_flax.errors import CheckpointDamagedError, CheckpointError, CheckpointMismatchError
from flux_flax.policy import flux_default_policy

REPO = Path(__file__).resolve().parents[1]
TINY_GROUP = 16  # tiny widths (32, 128, 160) are multiples of 16, not of 256


@pytest.fixture(scope="module")
def tiny_ref():
    return flux_fixtures.diffusers_transformer(FluxConfig.tiny(), seed=1)


@pytest.fixture(scope="module")
def tiny_src(tiny_ref, tmp_path_factory):
    return flux_fixtures.save_diffusers(tiny_ref, tmp_path_factory.mktemp("tiny") / "transformer")


@pytest.fixture(scope="module")
def small_ref():
    return flux_fixtures.diffusers_transformer(FluxConfig.small(), seed=2)


def run_cli(capsys, *args) -> tuple[int, list[str]]:
    """Runs `convrot-convert` in process -> (exit status, stderr lines other than the progress bar)."""
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    return code, [line for line in lines if "convrot-convert:  " not in line and "%|" not in line]


def flat_state(model) -> dict:
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def assert_same_state(model, reference) -> None:
    got, want = flat_state(model), flat_state(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, inputs):
    return nnx.merge(graphdef, state)(**inputs)


def assert_same_output(model, reference, config: FluxConfig) -> None:
    """Both models run through one compiled forward (their graphs are equal)."""
    inputs = {k: jnp.asarray(v) for k, v in flux_fixtures.flux_inputs(config, batch=1).items()}
    got, want = (np.asarray(_forward(*nnx.split(m), inputs)) for m in (model, reference))
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)


def assert_nothing_loadable(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.convrot-tmp-*")), "temporary directory left behind"
    with pytest.raises(CheckpointError):
        load_checkpoint(out)


# Round trips.


@pytest.mark.slow
def test_round_trip_bit_identical_to_in_memory_quantization(small_ref, tmp_path, capsys):
    """At the default group size 256, which the small model's widths allow (the tiny model at
    group 16 round-trips state for state in test_bfl_layout)."""
    config = FluxConfig.small()
    src = flux_fixtures.save_diffusers(small_ref, tmp_path / "transformer")
    group = 256
    out = tmp_path / "w4a4"
    code, err = run_cli(capsys, src, out, "--group-size", group)
    assert code == 0, err

    model, metadata = load_checkpoint(out)
    reference = quantize_model(load_transformer(src), flux_default_policy(), group_size=group)
    assert_same_state(model, reference)
    assert_same_output(model, reference, config)

    assert metadata["model_config"] == config.to_dict()
    assert metadata["quantization"]["group_size"] == group
    assert metadata["quantization"]["policy"] == flux_default_policy().to_dict()
    (entry,) = metadata["source"]["files"]
    file = Path(src) / entry["name"]
    assert entry["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert type(model.transformer_blocks[0].attn.to_q).__name__ == "ConvDense4bit"
    assert type(model.transformer_blocks[0].norm1.linear).__name__ == "Dense4bitWeightOnly"
    assert type(model.proj_out).__name__ == "Linear"


def test_cli_prints_summary(tiny_src, tmp_path, capsys):
    code = cli.main([str(tiny_src), str(tmp_path / "out"), "--group-size", str(TINY_GROUP), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "quantized to int4" in out and "kept" in out and "x smaller" in out


def test_bfl_layout(tiny_ref, tmp_path):
    from convert.convert import convert_checkpoint

    src = flux_fixtures.save_bfl(tiny_ref, tmp_path / "flux1-tiny.safetensors", prefix=True)
    out = tmp_path / "w4a4"
    # A bfl file has no config.json and tiny's RoPE axes cannot be inferred from shapes: pass it.
    convert_checkpoint(src, out, format="bfl", config=FluxConfig.tiny(), group_size=TINY_GROUP, progress=False)
    model, metadata = load_checkpoint(out)
    assert metadata["source"]["layout"] == "bfl"
    assert metadata["source"]["files"][0]["name"] == src.name
    reference = quantize_model(load_transformer(src, config=FluxConfig.tiny()), group_size=TINY_GROUP)
    assert_same_state(model, reference)


def test_bfl_with_inferred_config(small_ref, tmp_path, capsys):
    src = flux_fixtures.save_bfl(small_ref, tmp_path / "flux1-small.safetensors")
    out = tmp_path / "w4a4"
    code, err = run_cli(capsys, src, out, "--quiet")
    assert code == 0, err
    model, metadata = load_checkpoint(out)
    assert FluxConfig.from_dict(metadata["model_config"]) == FluxConfig.small()
    assert_same_state(model, quantize_model(load_transformer(src)))


def test_sharded_input_and_pipeline_root(small_ref, tmp_path, capsys):
    src = flux_fixtures.save_diffusers(small_ref, tmp_path / "FLUX" / "transformer", max_shard_size="5MB")
    assert len(list(src.glob("*.safetensors"))) > 2
    out = tmp_path / "w4a4"
    code, err = run_cli(capsys, tmp_path / "FLUX", out, "--quiet")  # the pipeline root
    assert code == 0, err
    model, metadata = load_checkpoint(out)
    names = [f["name"] for f in metadata["source"]["files"]]
    assert names == sorted(f"transformer/{p.name}" for p in src.glob("*.safetensors"))
    assert_same_state(model, quantize_model(load_transformer(src)))


def test_other_quantization_settings(small_ref, tmp_path, capsys):
    src = flux_fixtures.save_diffusers(small_ref, tmp_path / "transformer")
    policy = tmp_path / "policy.json"
    rules = {"rules": [[r"single_transformer_blocks\.\d+\.proj_out", "w4a4"], [r".*\.ff\..*", "w4a16"]],
             "default": "bf16"}
    policy.write_text(json.dumps(rules))
    out = tmp_path / "w4a4"
    code, err = run_cli(capsys, src, out, "--hadamard", "sylvester", "--group-size", 128, "--scale-group", 64,
                        "--policy", policy, "--quiet")
    assert code == 0, err
    model, metadata = load_checkpoint(out)
    assert metadata["quantization"]["scale_group"] == 64 and metadata["quantization"]["hadamard"] == "sylvester"
    reference = quantize_model(load_transformer(src), QuantPolicy.from_dict(rules), group_size=128,
                               hadamard="sylvester", scale_group=64)
    assert_same_state(model, reference)
    assert type(model.transformer_blocks[0].attn.to_q).__name__ == "Linear"


def test_no_quantize_writes_bf16(tiny_src, tmp_path, capsys):
    out = tmp_path / "bf16"
    code, err = run_cli(capsys, tiny_src, out, "--no-quantize", "--quiet")
    assert code == 0, err
    model, metadata = load_checkpoint(out)
    assert metadata["quantization"] is None
    assert_same_state(model, load_transformer(tiny_src))


def test_sharding_argument_places_leaves(tiny_src, tmp_path):
    from convert.convert import convert_checkpoint

    out = tmp_path / "w4a4"
    convert_checkpoint(tiny_src, out, group_size=TINY_GROUP, progress=False)
    device = jax.devices()[-1]
    seen = []

    def place(path, leaf):
        seen.append(path)
        return jax.sharding.SingleDeviceSharding(device)

    model, _ = load_checkpoint(out, sharding=place)
    assert len(seen) == len(flat_state(model))
    assert all(v.devices() == {device} for v in flat_state(model).values())


# Existing output.


def test_overwrite_replaces_only_a_convrot_checkpoint(tiny_src, tmp_path, capsys):
    out = tmp_path / "w4a4"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, tiny_src, out, "--group-size", TINY_GROUP, "--quiet")
    assert code == 1 and len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    code, err = run_cli(capsys, tiny_src, out, "--group-size", TINY_GROUP, "--quiet", "--overwrite")
    assert code == 1 and len(err) == 1 and "not a convrot-jax checkpoint" in err[0], err
    assert (out / "keep.txt").read_text() == "mine"

    ours = tmp_path / "ours"
    assert run_cli(capsys, tiny_src, ours, "--group-size", TINY_GROUP, "--quiet")[0] == 0
    code, err = run_cli(capsys, tiny_src, ours, "--no-quantize", "--quiet", "--overwrite")
    assert code == 0, err
    assert load_checkpoint(ours)[1]["quantization"] is None
    assert not list(tmp_path.glob(".*.convrot-tmp-*"))


def test_output_never_the_source_or_around_it(tiny_src, tmp_path, capsys):
    """The source, the folder holding it, and a checkpoint inside it are never written over."""
    root = tmp_path / "FLUX"
    src = flux_fixtures.save_pipeline_root(flux_fixtures.diffusers_transformer(FluxConfig.tiny(), seed=1), root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for out in (root, root / "transformer", tmp_path):
        code, err = run_cli(capsys, src, out, "--group-size", TINY_GROUP, "--quiet", "--overwrite")
        assert code == 1 and len(err) == 1 and "source" in err[0], (out, err)
    inside = root / "w4a4"  # a fresh checkpoint inside the source folder is fine; replacing it is not
    assert run_cli(capsys, src, inside, "--group-size", TINY_GROUP, "--quiet")[0] == 0
    code, err = run_cli(capsys, src, inside, "--group-size", TINY_GROUP, "--quiet", "--overwrite")
    assert code == 1 and "inside the source" in err[0], err
    assert {p: p.read_bytes() for p in before} == before


# Bad inputs: one line naming the problem, exit status 1, nothing loadable.


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of a tiny diffusers folder with its tensors edited by `edit(dict) -> dict`."""
    dst.mkdir(parents=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = edit(load_file(src / "diffusion_pytorch_model.safetensors"))
    save_file(tensors, dst / "diffusion_pytorch_model.safetensors")
    return dst


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1000)


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00garbage, not a JSON header....."
    path.write_bytes(bytes(data))


KEY = "transformer_blocks.0.attn.to_k.weight"


@pytest.mark.parametrize(
    "case, expected",
    [
        ("truncated", ["diffusion_pytorch_model.safetensors", "incomplete metadata"]),
        ("corrupt", ["diffusion_pytorch_model.safetensors", "not a readable safetensors"]),
        ("missing", ["missing", KEY]),
        ("unexpected", ["unexpected", "transformer_blocks.0.attn.extra.weight"]),
        ("shape", [KEY, "(32, 32)", "(32, 16)"]),
        ("dtype", [KEY, "I8"]),
        ("not_flux", ["not a FLUX"]),
        ("wrong_class", ["UNet2DConditionModel"]),
        ("wrong_format", ["diffusers checkpoint, not bfl"]),
        ("nonfinite", [KEY, "2 NaN/Inf value(s) of 1024", "--allow-nonfinite"]),
    ],
)
def test_bad_input(case, expected, tiny_src, tmp_path, capsys):
    src = tmp_path / "src"
    extra = []
    if case in ("truncated", "corrupt", "wrong_class", "wrong_format"):
        src = _rewrite(tiny_src, src, lambda t: t)
        weights = src / "diffusion_pytorch_model.safetensors"
        if case == "truncated":
            _truncate(weights)
        elif case == "corrupt":
            _corrupt_header(weights)
        elif case == "wrong_class":
            config = json.loads((src / "config.json").read_text())
            (src / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
        else:
            extra = ["--format", "bfl"]
    elif case == "missing":
        src = _rewrite(tiny_src, src, lambda t: {k: v for k, v in t.items() if k != KEY})
    elif case == "unexpected":
        src = _rewrite(tiny_src, src, lambda t: {**t, "transformer_blocks.0.attn.extra.weight": t[KEY]})
    elif case == "shape":
        src = _rewrite(tiny_src, src, lambda t: {**t, KEY: np.ascontiguousarray(t[KEY][:, :16])})
    elif case == "nonfinite":
        def poison(t):
            bad = t[KEY].copy()
            bad[0, 0], bad[3, 5] = np.nan, np.inf
            return {**t, KEY: bad}

        src = _rewrite(tiny_src, src, poison)
    elif case == "dtype":
        src = _rewrite(tiny_src, src, lambda t: {**t, KEY: t[KEY].astype(np.int8)})
    elif case == "not_flux":
        src = tmp_path / "model.safetensors"
        save_file({"encoder.weight": np.ones((4, 4), np.float32)}, src)
    out = tmp_path / "out"
    code, err = run_cli(capsys, src, out, "--group-size", TINY_GROUP, "--quiet", *extra)
    assert code == 1
    assert len(err) == 1 and err[0].startswith("convrot-convert: error: "), err
    for fragment in expected:
        assert fragment in err[0], (fragment, err[0])
    assert_nothing_loadable(out)
    if case == "nonfinite":
        assert run_cli(capsys, src, out, "--group-size", TINY_GROUP, "--quiet", "--allow-nonfinite")[0] == 0


def test_policy_file_must_be_utf8_json(tiny_src, tmp_path, capsys):
    policy = tmp_path / "policy.json"
    policy.write_bytes(b"\xff\xfe[]")
    code, err = run_cli(capsys, tiny_src, tmp_path / "out", "--policy", policy)
    assert code == 2 and str(policy) in err[-1] and "not UTF-8" in err[-1], err
    policy.write_text("{}")
    code, err = run_cli(capsys, tiny_src, tmp_path / "out", "--policy", policy, "--quiet")
    assert code == 1 and str(policy) in err[-1] and "rules" in err[-1], err


def test_error_during_conversion_removes_partial_output(tiny_src, tmp_path, monkeypatch):
    """A failure after part of the checkpoint is on disk (here: the fifth tensor) leaves nothing."""
    from convert import convert as conversion

    real, calls = conversion._convert_tensor, []

    def failing(*args):
        calls.append(args[0])
        if len(calls) == 5:
            raise CheckpointError(f"injected failure at {args[0]}")
        return real(*args)

    monkeypatch.setattr(conversion, "_convert_tensor", failing)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="injected"):
        conversion.convert_checkpoint(tiny_src, out, group_size=TINY_GROUP, progress=False, chunk_bytes=1)
    assert_nothing_loadable(out)


def test_killed_midway_leaves_nothing_loadable(small_ref, tmp_path, caplog):
    src = flux_fixtures.save_diffusers(small_ref, tmp_path / "transformer")
    out = tmp_path / "out"
    # Small chunks: the checkpoint is written in many Orbax partial saves; kill after the first.
    code = (f"from convert.convert import convert_checkpoint; "
            f"convert_checkpoint({str(src)!r}, {str(out)!r}, progress=False, chunk_bytes=1 << 16)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not list(tmp_path.glob(".out.convrot-tmp-*/checkpoint.partial_save/*")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no partial save appeared"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(out)
    (stale,) = tmp_path.glob(".out.convrot-tmp-*")
    # The next conversion to the same output removes the leftover and says so.
    from convert.convert import convert_checkpoint

    with caplog.at_level(logging.WARNING, logger="flux_flax"):
        convert_checkpoint(src, out, progress=False)
    assert not stale.exists() and f"removed {stale}" in caplog.text
    load_checkpoint(out)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_conversion_says_so_and_leaves_nothing(sig, small_ref, tmp_path):
    src = flux_fixtures.save_diffusers(small_ref, tmp_path / "transformer")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "convert.cli", str(src), str(out), "--quiet", "--no-compile-cache"],
                            env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.convrot-tmp-*")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the conversion did not start"
        time.sleep(0.01)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + sig, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"convrot-convert: interrupted; nothing was written to {out} "
                     f"({'Ctrl-C' if sig == signal.SIGINT else 'SIGTERM'})"], err
    assert not out.exists() and not list(tmp_path.glob(".out.convrot-tmp-*"))


# Metadata checks at load.


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_src, tmp_path_factory):
    from convert.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "w4a4"
    convert_checkpoint(tiny_src, out, group_size=TINY_GROUP, progress=False)
    return out


def test_load_refuses_other_group_size_or_config(tiny_checkpoint):
    load_checkpoint(tiny_checkpoint, config=FluxConfig.tiny(), group_size=TINY_GROUP, hadamard="regular")
    with pytest.raises(CheckpointMismatchError, match="group_size is 16, expected 256"):
        load_checkpoint(tiny_checkpoint, group_size=256)
    with pytest.raises(CheckpointMismatchError, match="hadamard is regular, expected sylvester"):
        load_checkpoint(tiny_checkpoint, hadamard="sylvester")
    with pytest.raises(CheckpointMismatchError, match="model config"):
        load_checkpoint(tiny_checkpoint, config=FluxConfig.tiny(num_layers=2))


def _edit_metadata(checkpoint: Path, tmp_path: Path, edit) -> Path:
    """A copy of `checkpoint` with its JSON metadata edited by `edit(dict)`."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(checkpoint, copy)
    meta_file = copy / "_CHECKPOINT_METADATA"
    meta = json.loads(meta_file.read_text())
    edit(meta["custom_metadata"])
    meta_file.write_text(json.dumps(meta))
    return copy


def test_load_refuses_other_format_version(tiny_checkpoint, tmp_path):
    edited = _edit_metadata(tiny_checkpoint, tmp_path, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointMismatchError, match="format version 99"):
        load_checkpoint(edited, verify=False)


def test_load_refuses_arrays_that_do_not_match_the_config(tiny_checkpoint, tmp_path):
    edited = _edit_metadata(tiny_checkpoint, tmp_path, lambda m: m["model_config"].update(joint_attention_dim=64))
    with pytest.raises(CheckpointMismatchError, match=r"context_embedder.kernel is stored as \(32, 32\)"):
        load_checkpoint(edited, verify=False)


@pytest.mark.parametrize("edit", [
    lambda m: m["quantization"].update(group_size=32),
    lambda m: m["quantization"].update(hadamard="sylvester"),
    lambda m: m["model_config"].update(axes_dims_rope=[4, 6, 6]),
], ids=["group_size", "hadamard", "rope_axes"])
def test_edited_settings_are_refused(edit, tiny_checkpoint, tmp_path):
    edited = _edit_metadata(tiny_checkpoint, tmp_path, edit)
    with pytest.raises(CheckpointDamagedError, match="file _CHECKPOINT_METADATA (was altered|has)"):
        load_checkpoint(edited)


def _data_files(checkpoint: Path) -> list[Path]:
    return sorted(p for p in checkpoint.rglob("d/*") if p.is_file())


def _damaged_copy(checkpoint: Path, tmp_path: Path, damage) -> Path:
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(checkpoint, copy)
    damage(copy)
    return copy


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case, fragment", [
    ("data file removed", "is missing"),
    ("manifest.ocdbt removed", "manifest.ocdbt is missing"),
    ("bytes flipped", "was altered after writing"),
    ("truncated", "bytes"),
    ("integrity manifest removed", "integrity manifest convrot-integrity.json is missing"),
])
def test_damaged_checkpoint_is_refused_in_one_line(case, fragment, tiny_checkpoint, tmp_path):
    def damage(copy: Path) -> None:
        data = _data_files(copy)[-1]
        if case == "data file removed":
            data.unlink()
        elif case == "manifest.ocdbt removed":
            (copy / "state" / "manifest.ocdbt").unlink()
        elif case == "bytes flipped":
            _flip_bytes(data)
        elif case == "truncated":
            os.truncate(data, data.stat().st_size // 2)
        else:
            (copy / "convrot-integrity.json").unlink()

    damaged = _damaged_copy(tiny_checkpoint, tmp_path, damage)
    with pytest.raises(CheckpointDamagedError) as info:
        load_checkpoint(damaged)
    message = str(info.value)
    assert "\n" not in message and str(damaged) in message and fragment in message, message


# Loads argv[1] unverified in a process of its own, printing the error: orbax and TensorStore write
# to stderr from their threads and at exit, which only a separate process shows whole.
LOAD_UNVERIFIED = """
import sys
from flux_flax.checkpoint import load_checkpoint
from flux_flax.errors import CheckpointError
try:
    load_checkpoint(sys.argv[1], verify=False)
except CheckpointError as e:
    print(e)
"""


@pytest.mark.parametrize("case", ["removed", "truncated"])
def test_unverified_missing_or_truncated_array_file_is_named_and_quiet(case, tiny_checkpoint, tmp_path):
    """Without the digests the array files are still stat'ed: a missing or truncated one is named
    in one line before TensorStore reads it (its failed reads print ~30 KB of event-loop errors)."""
    def damage(copy: Path) -> None:
        for data in _data_files(copy):
            data.unlink() if case == "removed" else os.truncate(data, data.stat().st_size // 2)

    damaged = _damaged_copy(tiny_checkpoint, tmp_path, damage)
    run = subprocess.run([sys.executable, "-c", LOAD_UNVERIFIED, str(damaged)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    fragment = "is missing" if case == "removed" else "bytes"
    assert f"checkpoint {damaged} is damaged: file state/" in run.stdout and fragment in run.stdout, run.stdout
    assert len(run.stdout.splitlines()) == 1, run.stdout
    noise = ("Traceback", "Event loop is closed", "never retrieved", "DATA_LOSS", "NOT_FOUND")
    assert not any(n in run.stderr for n in noise), run.stderr[-3000:]


def test_unverified_load_ignores_an_unreadable_manifest(tiny_checkpoint, tmp_path):
    """--no-verify stays the way past a damaged integrity manifest when the arrays are whole."""
    damaged = _damaged_copy(tiny_checkpoint, tmp_path, lambda copy: (copy / "convrot-integrity.json").write_text("{"))
    with pytest.raises(CheckpointDamagedError, match="convrot-integrity.json is unreadable"):
        load_checkpoint(damaged)
    model, _ = load_checkpoint(damaged, verify=False)
    reference, _ = load_checkpoint(tiny_checkpoint)
    assert_same_state(model, reference)


@pytest.mark.parametrize("case", ["bytes flipped", "data file removed"])
def test_unverified_damage_still_gives_one_line(case, tiny_checkpoint, tmp_path):
    """With verification off, flipped bytes in a compressed array file or a missing one is
    still reported in one line (not TensorStore's traceback); it cannot always be detected."""
    def damage(copy: Path) -> None:
        for data in _data_files(copy):
            _flip_bytes(data) if case == "bytes flipped" else data.unlink()

    damaged = _damaged_copy(tiny_checkpoint, tmp_path, damage)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(damaged, verify=False)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600 and str(damaged) in message, message


def test_relative_paths_are_resolved(tiny_src, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, os.path.relpath(tiny_src, tmp_path), "w4a4", "--group-size", TINY_GROUP, "--quiet")
    assert code == 0, err
    model, metadata = load_checkpoint("w4a4")
    assert metadata["quantization"]["group_size"] == TINY_GROUP


def test_load_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a readable Orbax checkpoint|no such"):
        load_checkpoint(tmp_path)


def test_save_checkpoint_of_an_in_memory_model(tiny_src, tmp_path):
    """`save_checkpoint` writes what the converter would for a model quantized in memory."""
    from flux_flax.checkpoint import save_checkpoint

    settings = {"group_size": TINY_GROUP, "hadamard": "regular", "scale_group": None}
    model = quantize_model(load_transformer(tiny_src), flux_default_policy(), **settings)
    quantization = {**settings, "policy": flux_default_policy().to_dict()}
    path = save_checkpoint(model, tmp_path / "mem", quantization=quantization, source={"layout": "in-memory"})
    restored, metadata = load_checkpoint(path)
    assert metadata["source"] == {"layout": "in-memory"} and metadata["quantization"] == quantization
    assert_same_state(restored, model)


# The T5 text encoder (--part text_encoder_2).

T5_KEY = "encoder.block.1.layer.1.DenseReluDense.wo.weight"


@pytest.fixture(scope="module")
def t5_root(tmp_path_factory):
    """A pipeline root holding a tiny random T5 v1.1 encoder (widths 32 and 64) in text_encoder_2/."""
    from flux_flax.demo_assets import tiny_t5, tiny_t5_tokenizer

    root = tmp_path_factory.mktemp("t5root")
    tiny_t5(tiny_t5_tokenizer(), 32, num_layers=2).save_pretrained(root / "text_encoder_2")
    return root


@pytest.mark.parametrize("layout", ["root", "sharded-folder"])
def test_t5_round_trip_bit_identical_to_in_memory_quantization(layout, t5_root, tmp_path, capsys):
    from transformers import T5EncoderModel as HFT5EncoderModel

    from convrot_jax import Dense4bitWeightOnly
    from flux_flax.policy import t5_default_policy
    from flux_flax.t5 import T5Config
    from flux_flax.text_loading import load_t5, read_config

    folder = t5_root / "text_encoder_2"
    src = t5_root
    if layout == "sharded-folder":
        src = tmp_path / "sharded"
        HFT5EncoderModel.from_pretrained(folder).save_pretrained(src, max_shard_size="20KB")
        assert (src / "model.safetensors.index.json").is_file()
    out = tmp_path / "t5-w4a16"
    code, err = run_cli(capsys, src, out, "--part", "text_encoder_2", "--group-size", TINY_GROUP)
    assert code == 0, err

    model, metadata = load_checkpoint(out, part="text_encoder_2")
    reference = quantize_model(load_t5(folder), t5_default_policy(), group_size=TINY_GROUP)
    assert_same_state(model, reference)
    ids = jnp.asarray(np.arange(24)[None] % 300)
    got, want = np.asarray(model(ids), np.float32), np.asarray(reference(ids), np.float32)
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)
    assert metadata["part"] == "text_encoder_2" and metadata["format"] == "convrot-jax/t5-encoder"
    assert metadata["model_config"] == T5Config.from_dict(read_config(folder)).to_dict()
    assert metadata["quantization"]["policy"] == t5_default_policy().to_dict()
    assert len(metadata["source"]["files"]) == (1 if layout == "root" else len(list(src.glob("*.safetensors"))))
    ff = model.encoder.block[1].layer[1].DenseReluDense
    assert isinstance(ff.wo, Dense4bitWeightOnly) and isinstance(model.encoder.block[0].layer[0].SelfAttention.q,
                                                                   Dense4bitWeightOnly)
    assert type(model.shared).__name__ == "Embed" and model.encoder.embed_tokens is model.shared
    with pytest.raises(CheckpointMismatchError, match="holds the text_encoder_2 .*, not the transformer"):
        load_checkpoint(out, part="transformer")


def _t5_rewrite(t5_root: Path, dst: Path, edit) -> Path:
    """A copy of the tiny T5 folder with its tensors edited by `edit(dict) -> dict`."""
    dst.mkdir(parents=True)
    src = t5_root / "text_encoder_2"
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(edit(load_file(src / "model.safetensors")), dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("case, expected, status", [
    ("missing", ["missing", T5_KEY], 1),
    ("shape", [T5_KEY, "(32, 64)", "(32, 16)"], 1),
    ("nonfinite", [T5_KEY, "1 NaN/Inf value(s) of 2048", "--allow-nonfinite"], 1),
    ("file", ["converts from a folder"], 1),
    ("no_config", ["config.json"], 1),
    ("format", ["--format bfl is a transformer layout"], 2),
])
def test_t5_bad_input(case, expected, status, t5_root, tmp_path, capsys):
    src, extra = tmp_path / "src", []
    if case == "missing":
        _t5_rewrite(t5_root, src, lambda t: {k: v for k, v in t.items() if k != T5_KEY})
    elif case == "shape":
        _t5_rewrite(t5_root, src, lambda t: {**t, T5_KEY: np.ascontiguousarray(t[T5_KEY][:, :16])})
    elif case == "nonfinite":
        def poison(t):
            bad = t[T5_KEY].copy()
            bad[3, 5] = np.nan
            return {**t, T5_KEY: bad}

        _t5_rewrite(t5_root, src, poison)
    elif case == "file":
        src = t5_root / "text_encoder_2" / "model.safetensors"
    elif case == "no_config":
        _t5_rewrite(t5_root, src, lambda t: t)
        (src / "config.json").unlink()
    else:
        src, extra = t5_root, ["--format", "bfl"]
    out = tmp_path / "out"
    code, err = run_cli(capsys, src, out, "--part", "text_encoder_2", "--group-size", TINY_GROUP, "--quiet", *extra)
    assert code == status
    if status == 2:  # a usage error prints the usage first
        err = [line for line in err if line.startswith("convrot-convert: error: ")]
    assert len(err) == 1, err
    for fragment in expected:
        assert fragment in err[0], (fragment, err[0])
    assert not out.exists()


def test_t5_overwrite_replaces_only_a_convrot_checkpoint(t5_root, tmp_path, capsys):
    """The writer's rules hold for every part: a user's folder is never replaced, a checkpoint is."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = (t5_root, out, "--part", "text_encoder_2", "--group-size", TINY_GROUP, "--quiet", "--overwrite")
    code, err = run_cli(capsys, *args)
    assert code == 1 and "not a convrot-jax checkpoint" in err[0] and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    out.rmdir()
    assert run_cli(capsys, *args[:-1])[0] == 0
    assert run_cli(capsys, *args)[0] == 0
    assert load_checkpoint(out, part="text_encoder_2")[1]["part"] == "text_encoder_2"
