"""What a model batch holds, stated once without any dependency: the train and eval steps import this
(not the loader) so that stepping a model needs no audio decoding libraries."""

LABEL_PAD = -100  # Hugging Face's ignore index for padded label positions
# The batch arrays the model steps take (`index` stays on the host).
MODEL_INPUTS = ("input_values", "attention_mask", "labels", "example_mask")
