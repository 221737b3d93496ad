"""The training forward: token embeddings with image features scattered in, then the LLM.

Under ZeRO-3 every rank must run the same modules in the same order, or the parameter
all-gathers of one rank wait forever for the other. A micro-batch without images therefore
runs the vision encoder on one blank tile whose features enter the graph multiplied by zero:
the collectives match on every rank, and the result is exactly the text-only forward.
"""

from __future__ import annotations

import torch

from vlmscale.data.render import IGNORE


def _dummy_tile(model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    size = model.config.vision_config.image_size
    return torch.zeros((1, 3, size[0], size[1]), dtype=dtype)


def image_features(model: torch.nn.Module, pixel_values: torch.Tensor | None) -> torch.Tensor:
    """Projected features ``(tiles * image_seq_length, hidden)``; a blank tile when there are no images."""
    inner = model.model
    dtype = next(inner.multi_modal_projector.parameters()).dtype
    pixels = pixel_values.to(dtype) if pixel_values is not None else _dummy_tile(model, dtype)
    features = inner.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    return features.reshape(-1, features.shape[-1])


def vlm_logits(model: torch.nn.Module, *, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               pixel_values: torch.Tensor | None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    inner = model.model
    embeds = inner.get_input_embeddings()(input_ids)
    has_images = pixel_values is not None
    features = image_features(model, pixel_values).to(embeds.dtype)
    if has_images:
        mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"{int(mask.sum())} image tokens but {features.shape[0]} image features in the batch")
        embeds = embeds.masked_scatter(mask, features)
    else:
        embeds = embeds + 0.0 * features.sum()
    out = inner.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return model.lm_head(out.last_hidden_state)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy (fp32), zero where the label is ignored."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return loss.view(shift_labels.shape)


def num_supervised(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())
