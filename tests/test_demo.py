"""`convrot-flux demo` (and the CLI's argument checks): it writes valid PNGs with their settings,
prints W4A4-vs-bf16 figures, and the same seed gives the same image."""

import json

import numpy as np
import pytest
from PIL import Image

from flux_flax import cli
from flux_flax.demo import build_demo_pipeline
from flux_flax.pipeline import GenerationSettings, to_uint8

SIZE, STEPS = (64, 64), 2


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--size", f"{SIZE[1]}x{SIZE[0]}", "--steps", str(STEPS), "--seed", "7", "--out", str(out)]
    return cli.main(argv), out


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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--size", "100x64"], "multiples of 16"),
        (["demo", "--size", "big"], "width x height"),
        (["generate", "--model", "/nonexistent", "--prompt", "a cat", "--size", "1000x1024"], "multiples of 16"),
        (["generate", "--model", "/nonexistent"], "no prompts"),
        (["generate", "--model", "/nonexistent", "--prompt", "a cat"], "/nonexistent does not exist"),
    ],
)
def test_cli_bad_input(argv, message, capsys, tmp_path):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_empty_prompts_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n   \n")
    assert cli.main(["generate", "--model", str(tmp_path), "--prompts-file", str(prompts)]) == 2
    assert "no prompts" in capsys.readouterr().err
