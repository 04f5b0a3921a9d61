"""Code that more than one hybridmoe service uses: checkpoints, models, formats, tokenizer."""
