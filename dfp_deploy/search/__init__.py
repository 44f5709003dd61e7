"""AutoDFP search: an agent picks per-group keep ratios under a cost budget, rewarded by data-free fidelity."""
