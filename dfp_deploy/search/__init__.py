"""AutoDFP search: an agent picks per-group keep ratios under a cost budget, rewarded by data-free fidelity.

Entry points: space.build_space (what is searched), synthetic.bn_matched_inputs (data-free inputs),
reward.fidelity / reward.proxy (score a candidate), selection.LmmseSelector (which channels a searched count keeps,
by lmmse elimination, and the analytical error), env.MacCost / env.LatencyModel (budget cost models) and
loop.run_search (the search itself). Import the submodules directly; this package imports nothing heavy.
"""
