"""Training: the shapes world, tokenizer training, and pretraining the tiny-shapes model.

Read in the book's order: `shapes` (scenes, prompts and answers), `tokenizer_training`, then `pretrain`.
"""
