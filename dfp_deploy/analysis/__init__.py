"""Channel analysis: trace a model, find coupled channel groups, count MACs and parameters."""

from dfp_deploy.analysis.cost import count_macs, count_params, macs_by_module, module_macs
from dfp_deploy.analysis.groups import (Analysis, GroupMembers, analyze, nothing_pruned_notice,
                                        partly_pruned_notice)

__all__ = ["Analysis", "GroupMembers", "analyze", "count_macs", "count_params", "macs_by_module", "module_macs",
           "nothing_pruned_notice", "partly_pruned_notice"]
