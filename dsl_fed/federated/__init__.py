"""The Flower edge of dsl_fed: ServerApp and ClientApp logic, the slice strategy, run folders, the local runtime.

The rest of `dsl_fed` never imports this package at module level, so the core works without Flower; the
repo's ``server/`` and ``clients/`` entry modules and ``dsl_fed simulate`` are what load it.
"""
