"""Prompts as conditions: ayf.text.PromptEncoder on a tiny FLUX-shaped pipeline folder, against
diffusers' own FluxPipeline.encode_prompt, and the empty prompt as the transformer's null condition."""
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ayf.errors import ConfigError  # noqa: E402
from ayf.nn import FlowMap  # noqa: E402
from ayf.nn.flux import FluxBackbone  # noqa: E402
from ayf.text import PromptEncoder  # noqa: E402
from tests.text_pipeline import flux_pipeline  # noqa: E402

PROMPTS = ["a handwritten seven", "a picture of a handwritten digit one two three"]  # the second is too long


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return flux_pipeline(str(tmp_path_factory.mktemp("text") / "pipe"))


def test_prompts_are_encoded_as_the_pipeline_encodes_them(pipeline):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.FluxPipeline.from_pretrained(pipeline, local_files_only=True)
        text, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=8)
        cond = PromptEncoder(pipeline)(PROMPTS)
    torch.testing.assert_close(cond.text, text)
    torch.testing.assert_close(cond.pooled, pooled)
    assert cond.text_mask.sum(1).tolist() == [5, 8]
    assert not torch.allclose(cond.text[0], cond.text[1])


def test_a_long_prompt_is_truncated_and_said_so(pipeline):
    encoder = PromptEncoder(pipeline)
    with pytest.warns(UserWarning, match="11 tokens, tokenizer takes 8: truncated") as caught:
        encoder(PROMPTS)
    assert len([w for w in caught if "truncated" in str(w.message)]) == 2  # CLIP's and T5's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder(PROMPTS[:1])


def test_the_empty_prompt_is_the_transformers_null_condition(pipeline, tmp_path, gen):
    encoder = PromptEncoder(pipeline)
    torch.save(encoder.null_prompt(), tmp_path / "null.pt")
    net = FlowMap(FluxBackbone(pipeline, null_prompt=str(tmp_path / "null.pt")), s_embedding="none").eval()
    x, t = torch.randn(2, *net.data_shape, generator=gen), torch.tensor([0.8, 0.4])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cond = encoder(PROMPTS)
        torch.testing.assert_close(net.velocity(x, t, cond.unconditional()), net.velocity(x, t, encoder(["", ""])))
        assert not torch.allclose(net.velocity(x, t, cond), net.velocity(x, t, cond.unconditional()))


def test_a_folder_without_text_encoders_is_one_line(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(ConfigError, match="no text_encoder, tokenizer_2, text_encoder_2 in it"):
        PromptEncoder(str(tmp_path))
    with pytest.raises(ConfigError, match="pipeline folder not found"):
        PromptEncoder(str(tmp_path / "nowhere"))
