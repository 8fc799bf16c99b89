"""Caption shards (`ayf shards captions`): image-caption pairs written with the captions'
embeddings by a tiny FLUX-shaped pipeline's text encoders, bad records skipped and counted, read
back into batches whose prompt fields are the pipeline's encoding of each example's caption."""
import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ayf.cli import main  # noqa: E402
from ayf.data.images import ShardSource, sample_pipeline  # noqa: E402
from ayf.data.shards import read_manifest  # noqa: E402
from ayf.text import PromptEncoder  # noqa: E402
from tests.text_pipeline import caption, flux_pipeline  # noqa: E402

N = 9


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return flux_pipeline(str(tmp_path_factory.mktemp("capt") / "pipe"))


def caption_list(folder, n=N, bad=True):
    """``n`` 16x16 grey images with captions of their digit (and labels), plus, with ``bad``, a
    missing image, a line that is not JSON and a record without a caption."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
        words = caption(i % 10) + (" digit one two three" if i == 4 else "")  # the fifth is too long
        lines.append(json.dumps({"image": f"{i}.png", "caption": words, "label": i % 10}))
    if bad:
        lines[3:3] = [json.dumps({"image": "gone.png", "caption": "a handwritten one", "label": 1}), "{not json",
                      json.dumps({"image": "0.png", "label": 0})]
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("space", ["pixels", "latents"])
def test_caption_shards_hold_each_captions_embeddings(tmp_path, pipeline, capsys, space):
    pairs = caption_list(tmp_path / "pairs")
    out = tmp_path / "shards"
    args = ["shards", "captions", "--input", str(pairs), "--pipeline", pipeline, "--output", str(out),
            "--max_size_mb", "0.002", "--batch_size", "4"] + (["--pixels"] if space == "pixels" else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    said = capsys.readouterr()
    assert f"skipped 3 bad record(s) of {N + 3}" in said.out and "captions.jsonl line 4" in said.out
    assert "warning: prompt 'a handwritten four digit one two three': 9 tokens" in said.err + said.out  # said so
    manifest = read_manifest(out)
    assert manifest["count"] == N and len(manifest["shards"]) > 1
    assert manifest["text"]["pipeline"] == pipeline and manifest["text"]["null_prompt"] == "null_prompt.pt"
    assert manifest["shape"] == ([1, 16, 16] if space == "pixels" else [4, 4, 4])
    samples = list(sample_pipeline(ShardSource(str(out))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = PromptEncoder(pipeline)([caption(i % 10) + (" digit one two three" if i == 4 else "") for i in range(N)])
        null = PromptEncoder(pipeline).null_prompt()
    for i, sample in enumerate(samples):
        assert int(sample["label"]) == i % 10
        torch.testing.assert_close(sample["text"], want.text[i])
        torch.testing.assert_close(sample["pooled"], want.pooled[i])
        assert torch.equal(sample["text_mask"], want.text_mask[i])
    saved = torch.load(out / "null_prompt.pt", weights_only=True)
    torch.testing.assert_close(saved["text"], null["text"])
    assert main(args) == 2 and "not empty; pass --overwrite" in capsys.readouterr().err  # nothing written over


def test_an_interrupted_caption_write_resumes(tmp_path, pipeline, monkeypatch):
    import ayf.data.latent_shards as latent_shards

    pairs = caption_list(tmp_path / "pairs", bad=False)
    args = ["shards", "captions", "--input", str(pairs), "--pipeline", pipeline, "--max_size_mb", "0.002",
            "--batch_size", "4", "--pixels"]
    warnings.simplefilter("ignore")
    assert main(args + ["--output", str(tmp_path / "whole")]) == 0
    real, calls = latent_shards.prompt_arrays, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(latent_shards, "prompt_arrays", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--output", str(tmp_path / "cut")])
    assert not (tmp_path / "cut" / "manifest.json").exists()
    monkeypatch.setattr(latent_shards, "prompt_arrays", real)
    assert main(args + ["--output", str(tmp_path / "cut")]) == 0
    whole, cut = (list(sample_pipeline(ShardSource(str(tmp_path / d)))) for d in ("whole", "cut"))
    assert len(cut) == len(whole) == N
    for a, b in zip(whole, cut, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["text"], b["text"]) and torch.equal(a["pooled"], b["pooled"])


def test_a_caption_list_with_nothing_usable_or_no_list_is_one_line(tmp_path, pipeline, capsys):
    def error(*args):
        assert main(["shards", "captions", "--pipeline", pipeline, "--output", str(tmp_path / "o"), *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        return lines[-1]

    assert "no caption list at" in error("--input", str(tmp_path))
    (tmp_path / "captions.jsonl").write_text('{"image": "nothing.png", "caption": "a one"}\n')
    assert "no usable image-caption record (captions.jsonl line 1: FileNotFoundError" in error("--input", str(tmp_path))
    caption_list(tmp_path / "pairs", n=2, bad=False)
    assert "leave out --vae" in error("--input", str(tmp_path / "pairs"), "--vae", pipeline + "/vae")
    assert "no tokenizer, text_encoder, tokenizer_2, text_encoder_2 in it" in error("--input", str(tmp_path / "pairs"), "--pipeline", str(tmp_path / "pairs"))


def test_shards_and_conditions_name_the_prompt_fields_alike():
    from ayf.data.images import TEXT_FIELDS
    from ayf.nn.cond import TEXT_FIELDS as COND_FIELDS

    assert TEXT_FIELDS == COND_FIELDS
