"""Getting things in and out: images, the tokenizer, the processor's prompt layout, and checkpoints on disk.

- `images`, `tokenizer`, `processor`: images and prompts -> a batch of tensors, generated ids -> text;
- `safetensors`: the file format, read (mapped, no copy) and written (one tensor at a time);
- `layout`: the Hugging Face folder (tensor names, shards, index, config.json);
- `checkpoint`: `load_pretrained`, `load_model`, `save_pretrained`.

This package's `__init__` imports nothing, so that `paligemma.models` may use the format modules below it.
"""
