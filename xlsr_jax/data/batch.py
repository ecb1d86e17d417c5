"""What a model batch holds, stated once without any dependency: the train and eval steps import this
(not the loader) so that stepping a model needs no audio decoding libraries."""

import numpy as np

LABEL_PAD = -100  # Hugging Face's ignore index for padded label positions
# The batch arrays the model steps take (`index` stays on the host).
MODEL_INPUTS = ("input_values", "attention_mask", "labels", "example_mask")


def empty_batch(samples: int, label_len: int, index: np.ndarray) -> dict[str, np.ndarray]:
    """A batch of ``len(index)`` rows to fill in: zero audio and mask ``[rows, samples]``, labels
    ``[rows, label_len]`` of LABEL_PAD, ``example_mask`` 0 where ``index`` (int64 ``[rows]``) is -1 (a dummy
    row), and ``index`` itself."""
    index = np.asarray(index, dtype=np.int64)
    rows = len(index)
    return {
        "input_values": np.zeros((rows, samples), np.float32),
        "attention_mask": np.zeros((rows, samples), np.int32),
        "labels": np.full((rows, label_len), LABEL_PAD, np.int32),
        "example_mask": (index >= 0).astype(np.float32),
        "index": index.copy(),
    }
