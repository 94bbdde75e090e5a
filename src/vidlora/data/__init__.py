"""Data: records, media, templates, tokenization, dataset, collate, sampler, check, synthetic."""
