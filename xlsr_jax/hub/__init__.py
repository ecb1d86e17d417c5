"""The Hugging Face side: export to a PyTorch model folder, model card, push to the Hub."""
