"""`xlsr-jax pretrain`: continued self-supervised wav2vec 2.0 pretraining (masked contrastive task) with the
trainer's machinery (train/loop.py `run_training`), as a `train.objective.Objective`."""
