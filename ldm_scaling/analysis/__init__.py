"""Analysis of results tables: optimal CFG, sampling efficiency across sizes, figures, advice.

Reads the table written by the eval job (``ldm_scaling.eval.results.load``) and needs only pandas,
numpy and matplotlib, so a notebook can use it without JAX::

    from ldm_scaling import analysis
    from ldm_scaling.eval import results
    frame = results.load("gs://bucket/study/results")      # or a results.csv
    analysis.optimal_cfg(frame)                             # best CFG per model/sampler/steps
    analysis.pareto_front(frame, sampler="ddim")            # lower-left frontier over sizes
    analysis.crossovers(frame)                              # where bigger models start to win
    analysis.budget_comparisons(frame)                      # ... beyond the uncertainties
    analysis.size_effect(frame)                             # largest vs smallest, in CIs
    analysis.advise(frame, budget=10)                       # best cell within a cost budget
    analysis.plot_all(frame, "figures/")                    # the paper's Figs 3, 8, 9, 11

See docs/analysis.md for the conventions (sampling cost, training compute, crossovers). Names are
imported lazily, so importing the package stays cheap.
"""

import importlib

_EXPORTS = {
    "BudgetError": "budget", "advise": "budget", "format_advice": "budget",
    "optimal_cfg": "cfg", "optimal_cfg_both": "cfg",
    "Crossover": "efficiency", "cost_curves": "efficiency", "crossover": "efficiency",
    "crossovers": "efficiency", "frontier_segments": "efficiency", "pareto_front": "efficiency",
    "budget_comparisons": "efficiency", "front_significance": "efficiency",
    "noise_estimate": "efficiency", "pair_evidence": "efficiency", "size_effect": "efficiency",
    "distillation_comparison": "efficiency",
    "all_figures": "figures", "fig_cfg": "figures", "fig_cost": "figures",
    "fig_samplers": "figures", "fig_training": "figures", "plot_all": "figures",
    "fig_distillation": "figures", "distillation_points": "figures",
    "analyze": "report", "summary_markdown": "report",
    "sampler_comparison": "samplers", "sampler_fronts": "samplers",
    "AnalysisError": "table", "NoUsableRowsError": "table",
    "training_curves": "training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"ldm_scaling.analysis.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'ldm_scaling.analysis' has no attribute {name!r}")
