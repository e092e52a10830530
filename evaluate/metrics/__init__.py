"""The scorers, each as its paper computes it: `vqa` (PeFoMed), `llava_med`, `med_idefics`,
`report_metrics` (pycocoevalcap), with the shared VQA answer normalization in `normalize`."""
