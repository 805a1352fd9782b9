"""Evaluation metrics: FID (pytorch-fid's definition, in Flax) and CLIP score (named CLIP).

The eval-grid job calls::

    extractor = FeatureExtractor(batch_size=...)                # weights found or fetched
    ref = reference_stats(lambda: real_batches(), dataset=..., split=..., resolution=...,
                          n=..., extractor=extractor)          # cached .npz, checked metadata
    gen = compute_stats(extractor(samples_uint8), extractor.provenance)
    row["fid"] = fid_from_stats(gen, ref)
    scorer = CLIPScorer.from_pretrained("openai/clip-vit-large-patch14")  # or a local dir
    row.update(scorer.score(samples_uint8, prompts).columns())

Names are imported lazily, so importing the package stays cheap.
"""

import importlib

_EXPORTS = {
    "CLIPScore": "clip_score", "CLIPScorer": "clip_score", "score_from_cosine": "clip_score",
    "FeatureExtractor": "fid", "FIDStats": "fid", "RankDeficientWarning": "fid",
    "StatsMismatchError": "fid", "compute_stats": "fid", "fid_from_stats": "fid",
    "fid_of_paths": "fid", "frechet_distance": "fid", "load_stats": "fid",
    "reference_stats": "fid", "save_stats": "fid", "stats_of_path": "fid",
    "FIDWeights": "fid_weights", "WeightsError": "fid_weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"ldm_scaling.eval.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'ldm_scaling.eval' has no attribute {name!r}")
