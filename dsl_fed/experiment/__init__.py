"""Experiments: the paper's Table 3 as one command - a grid of settings x seeds, central and federated side by
side, each cell a Ray task (`runner`), scored like for like (`cells`), tabulated (`table`)."""

from dsl_fed.experiment.cells import Cell, CellResult, best_round
from dsl_fed.experiment.runner import DEFAULT_GRID, parse_grid, run_experiment

__all__ = ["DEFAULT_GRID", "Cell", "CellResult", "best_round", "parse_grid", "run_experiment"]
