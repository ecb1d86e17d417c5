"""Inference: the eval/predict step, evaluation with WER/CER, transcription, LM decoding."""
