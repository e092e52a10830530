"""Data: the synthetic demo dataset, dataset readers, prompt templates, image loading, the demo
tokenizer, the dataset/collate pair that produces the Batch contract, and a resumable sampler.

Modules: `synthetic` (generator + CLI), `readers` (Sample, DataError, read_dataset; each
dataset's split files in SPLIT_FILES; image paths kept inside the image folder), `prompts`,
`images` (load_image, ImageLoadError), `tokenizer` (build_demo_tokenizer, load_tokenizer),
`collate` (VLMDataset, collate, generation_batch, prompt_for_generation), `sampler`
(ResumableSampler). Functions take explicit arguments (paths, sizes, template names), not
config objects.
"""
