"""The Flax Wav2Vec2ForCTC and Wav2Vec2ForPreTraining models, their Hugging Face weight mapping and the CTC loss."""

from xlsr_jax.model.convert import flax_to_pytorch, pytorch_to_flax
from xlsr_jax.model.loss import ctc_loss, required_frames
from xlsr_jax.model.pretrained import load_pretrained, read_state_dict, save_pytorch_weights
from xlsr_jax.model.pretraining import (
    FlaxWav2Vec2ForPreTraining,
    PreTrainingOutput,
    gumbel_temperature,
    sample_mask_time_indices,
    sample_negative_indices,
)
from xlsr_jax.model.wav2vec2 import (
    FlaxWav2Vec2ForCTC,
    feat_extract_output_lengths,
    frame_mask_from_attention_mask,
    num_params,
    receptive_field,
)

__all__ = [
    "FlaxWav2Vec2ForCTC",
    "FlaxWav2Vec2ForPreTraining",
    "PreTrainingOutput",
    "ctc_loss",
    "feat_extract_output_lengths",
    "flax_to_pytorch",
    "frame_mask_from_attention_mask",
    "gumbel_temperature",
    "load_pretrained",
    "num_params",
    "pytorch_to_flax",
    "read_state_dict",
    "receptive_field",
    "required_frames",
    "sample_mask_time_indices",
    "sample_negative_indices",
    "save_pytorch_weights",
]
