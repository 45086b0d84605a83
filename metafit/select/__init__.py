"""Data selection for instruction tuning: DELIFT's in-context utility kernel and submodular objectives.

Public API::

    from metafit import select
    U = select.utility_matrix(model, tokenizer, queries, examples, workdir="runs/u", block=64)
    S = select.similarity_from_utility(U)                       # [0, 1], diagonal excluded
    idx = select.facility_location(S, budget=select.budget_of(0.3, len(S)))   # instruction tuning
    idx = select.flmi(S, query_sim, budget=30, eta=1.0)         # task-specific, [n, m] pool x target
    idx = select.flcg(S, private_sim, budget=30, nu=1.0)        # continual, [n, p] pool x existing

See :mod:`metafit.select.utility` (the kernel) and :mod:`metafit.select.objectives` (FL, FLMI,
FLCG and their greedy maximisation).
"""
from .objectives import (FLMI_FORMS, Objective, budget_of, facility_location, facility_location_objective, flcg,
                         flcg_objective, flmi, flmi_objective, greedy, objective_value, stochastic_greedy)
from .utility import DISTANCES, Prompts, as_pair, pair_distances, similarity_from_utility, utility_matrix

__all__ = [
    "DISTANCES", "FLMI_FORMS", "Objective", "Prompts", "as_pair", "budget_of", "facility_location",
    "facility_location_objective", "flcg", "flcg_objective", "flmi", "flmi_objective", "greedy",
    "objective_value", "pair_distances", "similarity_from_utility", "stochastic_greedy", "utility_matrix",
]
