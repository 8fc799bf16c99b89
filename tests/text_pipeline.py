"""A tiny FLUX-shaped text-to-image pipeline built offline from configs (nothing downloaded): a
small FluxTransformer2DModel, an AutoencoderKL, CLIP and T5 text encoders, and word-level
tokenizers made with the `tokenizers` library from a caption vocabulary; saved with
``FluxPipeline.save_pretrained``, the folder a user would have."""
from __future__ import annotations

import os

import torch

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = ("a", "handwritten", "digit", "picture", "of") + DIGITS
TEXT_DIM, POOLED_DIM = 24, 16


def tokenizer(length: int):
    """A word-level tokenizer (``<s> words </s>``, padded with ``<pad>``) that transformers loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(("<pad>", "<unk>", "<s>", "</s>") + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=length)


def flux_pipeline(folder: str, latent_channels: int = 4, image_size: int = 16, guidance_embeds: bool = False,
                  clip_length: int = 8, t5_length: int = 8, seed: int = 0, transformer: dict = None) -> str:
    """Writes the tiny pipeline to ``folder``; returns it. Latents are ``image_size / 4``;
    ``transformer`` overrides the transformer's sizes (layers, heads, head width, rotary axes)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    n = 4 + len(WORDS)
    sizes = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2,
             "axes_dims_rope": (2, 2, 4), **(transformer or {})}
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
        guidance_embeds=guidance_embeds, **sizes)
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=latent_channels,
                                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                                  block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                  sample_size=image_size)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=n, hidden_size=POOLED_DIM, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=clip_length,
                                        projection_dim=POOLED_DIM, bos_token_id=2, eos_token_id=3, pad_token_id=0))
    t5 = T5EncoderModel(T5Config(vocab_size=n, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=3, decoder_start_token_id=0))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15, base_image_seq_len=4, max_image_seq_len=64)
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer(clip_length),
                                  text_encoder_2=t5, tokenizer_2=tokenizer(t5_length), transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def caption(digit: int) -> str:
    return f"a handwritten {DIGITS[digit]}"


if __name__ == "__main__":  # python tests/text_pipeline.py FOLDER
    import sys

    print(flux_pipeline(os.path.abspath(sys.argv[1])))
