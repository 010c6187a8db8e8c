"""Small real models built on the spot, for tests and benchmarks: no downloads, nothing mocked.

:func:`build_tiny_pipeline` writes a tiny, randomly initialised ``StableDiffusionUpscalePipeline`` (a 7-channel UNet,
a 3-block VAE, a CLIP text encoder and tokenizer, DDPM and DDIM schedulers) with ``save_pretrained``: the diffusion
backend loads it through its real loading path, as a ``diffusers:`` model. :func:`compact_state` builds an SRVGG
compact (Real-ESRGAN "compact") state dict that spandrel recognises, with weights chosen to overflow fp16 if asked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def build_tiny_pipeline(folder: Path, unet_channels: tuple[int, int] = (16, 32)) -> Path:
    """Write a tiny random StableDiffusionUpscalePipeline (about 1.5 MB) to ``folder/pipe``; return that folder.

    Deterministic: the same call writes the same weights. ``unet_channels`` sets the UNet's width (larger for
    benchmarks that want real work per step).

    Raises:
        ImportError: torch, diffusers or transformers is not installed.
    """
    import diffusers
    import torch
    import transformers
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    # transformers 5 ignores CLIPTokenizer(vocab_file=..., merges_file=...): load it from a folder instead.
    tok_dir = folder / "tokenizer-src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for merged in ("th", "the</w>", "an", "and</w>"):
        vocab[merged] = len(vocab)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\na n\nan d</w>\n")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=7,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=unet_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        num_class_embeds=400,
    )  # noise_level indexes the class embeddings: more than max_noise_level (350)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=4,
        sample_size=128,
        scaling_factor=0.08333,
    )
    pipe = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear"),
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        ),
        max_noise_level=350,
    )
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"


def compact_state(
    scale: int = 2, num_feat: int = 8, num_conv: int = 2, overflow_fp16: bool = False, seed: int = 1
) -> dict[str, Any]:
    """An SRVGG compact state dict (spandrel's ``Compact``) with random weights.

    With ``overflow_fp16`` the middle layers' weights are large (activations beyond fp16's 65504, so fp16 gives Inf)
    and the last one tiny, which keeps fp32's output in range: what an fp16 overflow on a GPU looks like.

    Raises:
        ImportError: torch or spandrel is not installed.
    """
    import torch
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    sd = Compact(num_feat=num_feat, num_conv=num_conv, upscale=scale).state_dict()
    if overflow_fp16:
        g = torch.Generator().manual_seed(seed)
        convs = sorted(
            int(k.split(".")[1]) for k in sd if k.startswith("body.") and k.endswith(".weight") and sd[k].dim() == 4
        )
        for index in convs[:-2]:
            key = f"body.{index}.weight"
            sd[key] = torch.rand(sd[key].shape, generator=g) * 100
        key = f"body.{convs[-2]}.weight"
        sd[key] = torch.randn(sd[key].shape, generator=g) * 1e-7
    return sd
