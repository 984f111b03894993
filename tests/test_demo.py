"""`convrot-flux demo` (and the CLI's argument checks): it writes valid PNGs with their settings,
prints W4A4-vs-bf16 figures, and the same seed gives the same image."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_flax import cli
from flux_flax.demo import build_demo_pipeline
from flux_flax.pipeline import GenerationSettings, to_uint8

SIZE, STEPS = (64, 64), 2
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--size", f"{SIZE[1]}x{SIZE[0]}", "--steps", str(STEPS), "--seed", "7", "--out", str(out),
            "--no-compile-cache"]
    return cli.main(argv), out


@pytest.mark.slow
def test_demo_writes_valid_pngs_and_figures(demo_run, capsys):
    rc, out = demo_run
    assert rc == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name.rsplit("-", 1)[1] for p in pngs] == ["bf16.png", "w4a4.png"]
    images = []
    for path in pngs:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == (SIZE[1], SIZE[0]) and img.mode == "RGB"
            params = json.loads(img.text["parameters"])
            assert params["seed"] == 7 and params["num_inference_steps"] == STEPS and "a photo of a cat" in params["prompt"]
            images.append(np.asarray(img))
    assert images[0].std() > 1  # an image, not a flat fill
    diff = np.abs(images[0].astype(int) - images[1].astype(int))
    assert 0 < diff.mean() < 64  # W4A4 changes the image, but only a little


@pytest.mark.slow
def test_demo_is_deterministic(demo_run):
    """A freshly built demo pipeline, sampled with the demo's seed, reproduces the demo's bf16 PNG;
    another seed gives another image."""
    _, out = demo_run
    with Image.open(next(out.glob("*-bf16.png"))) as img:
        written = np.asarray(img)
    pipe = build_demo_pipeline(progress=False)
    settings = GenerationSettings(*SIZE, STEPS, 3.5, seed=7)
    prompt = json.loads(Image.open(next(out.glob("*-bf16.png"))).text["parameters"])["prompt"]
    embeds = pipe.encode_prompts([prompt])
    images = []
    for seed in (7, 8):
        latents = pipe.denoise(pipe.prepare_latents([seed], *SIZE), embeds, settings)
        images.append(to_uint8(pipe.decode(latents, *SIZE))[0])
    np.testing.assert_array_equal(images[0], written)
    assert np.abs(images[1].astype(int) - written.astype(int)).mean() > 1


def test_demo_pipeline_never_imports_torch():
    """The demo builds its tiny text encoders in JAX: `scripts/demo.sh` installs no torch."""
    code = ("import sys\nfrom flux_flax.demo import build_demo_pipeline\n"
            "pipe = build_demo_pipeline(progress=False)\n"
            "print(type(pipe.text_encoders).__name__, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split()[-2:] == ["JaxTextEncoders", "False"], out.stdout + out.stderr


@pytest.fixture
def usage_cases(tmp_path):
    """Files the bad-argument cases point at."""
    (tmp_path / "model").mkdir()
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "latin1.txt").write_bytes("un caf\xe9".encode("latin-1"))
    return tmp_path


GENERATE = ["generate", "--model", "{tmp}/model", "--prompt", "a cat"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--size", "100x64"], "multiples of 16"),
        (["demo", "--size", "big"], "width x height"),
        (["demo", "--steps", "0"], "at least 1"),
        ([*GENERATE, "--size", "1000x1024"], "multiples of 16"),
        (["generate", "--model", "{tmp}/model"], "no prompts"),
        (["generate", "--model", "/nonexistent", "--prompt", "a cat"], "model folder /nonexistent does not exist"),
        ([*GENERATE, "--steps", "0"], "--steps must be at least 1, got 0"),
        ([*GENERATE, "--guidance", "nan"], "guidance scale must be a finite number"),
        ([*GENERATE, "--seed", "-1"], "seed must be in"),
        ([*GENERATE, "--batch", "0"], "--batch must be at least 1"),
        ([*GENERATE, "--max-sequence-length", "600"], "--max-sequence-length must be in [1, 512]"),
        ([*GENERATE, "--attention", "fp4"], "--attention must be one of cudnn, xla, mosaic_bf16, sage8, sage8_fp8, sage_qk8, int8, got 'fp4'"),
        ([*GENERATE, "--out", "{tmp}/a-file"], "a-file is a file, not a folder"),
        ([*GENERATE, "--out", "{tmp}/a-file/sub"], "a-file is a file, not a folder"),
        ([*GENERATE, "--checkpoint", "{tmp}/nothing"], "checkpoint {tmp}/nothing does not exist"),
        (["generate", "--model", "{tmp}/model", "--prompts-file", "{tmp}/latin1.txt"], "latin1.txt is not UTF-8"),
        (["generate", "--model", "{tmp}/model", "--prompts-file", "{tmp}/none.txt"], "none.txt does not exist"),
    ],
)
def test_cli_usage_errors_exit_2_before_loading(argv, message, usage_cases, capsys):
    tmp = str(usage_cases)
    assert cli.main([a.replace("{tmp}", tmp) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", tmp) in err, err
    assert err.splitlines()[0].startswith("usage: convrot-flux")


def test_cli_empty_prompts_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n   \n")
    assert cli.main(["generate", "--model", str(tmp_path), "--prompts-file", str(prompts)]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_cli_version_and_fast_usage_errors():
    """Both command lines answer --version and a usage error without importing jax, flax or torch."""
    code = ("import sys, contextlib, io\n"
            "from flux_flax import cli\nfrom convert import cli as ccli\n"
            "for main, argv in ((cli.main, ['generate', '--model', '/nonexistent', '--prompt', 'x']),"
            " (ccli.main, ['/nonexistent', 'out'])):\n"
            "    with contextlib.redirect_stderr(io.StringIO()):\n"
            "        assert main(argv) == 2\n"
            "heavy = [m for m in ('jax', 'flax', 'torch', 'transformers', 'orbax') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    for module in ("flux_flax.cli", "convert.cli"):
        out = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0 and out.stdout.split()[-1] == importlib.metadata.version("convrot-jax"), out


def test_compilation_cache_is_written(tmp_path):
    """The CLIs' persistent compilation cache: a compiled program lands in the folder given."""
    code = ("import pathlib, sys\n"
            "from flux_flax.command_line import enable_compilation_cache\n"
            "enable_compilation_cache(pathlib.Path(sys.argv[1]))\n"
            "import jax\n"
            "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
            "jax.jit(lambda x: x * 2 + 1)(1.0).block_until_ready()\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], check=True, cwd=REPO)
    assert any((tmp_path / "cache").iterdir())
