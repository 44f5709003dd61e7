"""AutoDFP search: an agent picks per-group keep ratios under a cost budget, rewarded by data-free fidelity.

Entry points: space.build_space (what is searched),
reward.fidelity / reward.proxy (score a candidate), env.MacCost / env.LatencyModel (budget cost models) and
loop.run_search (the search itself). Which channels a searched count keeps is the pipeline's plan callable
(compress/select/). Import the submodules directly; this package imports nothing heavy.
"""
