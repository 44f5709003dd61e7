"""Find the coupled channel groups of a traced model: channels that must be pruned together.

Model. Every channel-carrying tensor (dim 1) gets a list of SLOTS, one per channel; a slot is a channel-class id.
Classes live in a union-find. Walking the graph in order:
  * conv (groups=1) / Linear on [N, C]: consumes its input slots, creates one fresh class per output channel;
  * depthwise conv, BatchNorm, elementwise ops, pooling, spatial reshapes/pads: output slot k = input slot k;
  * add/sub/mul/div of two channel tensors, cat along a non-channel dim: union slot k of every operand;
  * cat along dim 1: the operands' slot lists are concatenated;
  * ChannelPadShortcut / F.pad on the channel dim: fresh ZERO classes before/after the input slots. A ZERO class
    holds no producer, so "ZERO + c" in a later add simply makes the pad position a member of c's class; after
    pruning, the shortcut keeps exactly the pad positions whose class survives (that is how pads are recomputed).
    F.pad's sizes are literals in the model code, so its ZERO classes are frozen;
  * anything else is a BOUNDARY: the classes of all its inputs are frozen, its output gets fresh frozen classes.
  Model input classes and every class reaching a model output are frozen too.
After the walk, each union-find root is one CHANNEL. Channels produced by the same producer module are linked, and
a GROUP is a connected component of that link relation (so all residual-stream convs of a ResNet, the stem, and
the option-A padded stages form ONE group). A group with any frozen channel is not prunable.

Canonical channel order of a group (index 0..C-1): take the producers sorted by (most output channels first,
then graph order) and list each producer's output channels in its own order, skipping channels already listed.
The group's name is its first producer in graph order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from dfp_deploy.analysis.cost import module_macs
from dfp_deploy.analysis.trace import (NodeOp, TraceFailure, call_counts, describe_node, has_channels, shape_of,
                                       trace_with_shapes)
from dfp_deploy.core.errors import InputError
from dfp_deploy.core.types import ChannelGroup

_MAX_REASONS = 3


@dataclass(frozen=True)
class GroupMembers:
    """How every module touching a group maps to the group's channel indices (-1 = not this group, or ZERO).

    producers:   module -> for each OUTPUT channel of the module, the group channel index
    passthrough: BatchNorm / depthwise conv -> for each of its channels
    consumers:   conv / Linear -> for each INPUT channel
    shortcuts:   ChannelPadShortcut module -> (indices of its pad_before positions, indices of its pad_after positions)
    """

    producers: dict[str, list[int]]
    passthrough: dict[str, list[int]]
    consumers: dict[str, list[int]]
    shortcuts: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]

    def modules(self) -> list[str]:
        """Every module name that belongs to the group (shortcuts included)."""
        return [*self.producers, *self.passthrough, *self.consumers, *self.shortcuts]


@dataclass
class Analysis:
    """Channel groups of one model. `bn_after[producer]` names the BatchNorm applied directly to a producer's output
    (its only user), which importance and reconstruction use for BN-folded filters."""

    groups: list[ChannelGroup]
    warnings: list[str]
    bn_after: dict[str, str] = field(default_factory=dict)
    module_order: list[str] = field(default_factory=list)  # leaf modules as the traced forward calls them
    _members: dict[str, GroupMembers] = field(default_factory=dict, repr=False)

    def group(self, name: str) -> ChannelGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise InputError(f"no channel group named '{name}'; groups are: {_names_preview(self.groups)}")

    def members(self, group: str) -> GroupMembers:
        if group not in self._members:
            raise InputError(f"no channel group named '{group}'; groups are: {_names_preview(self.groups)}")
        return self._members[group]


def _names_preview(groups: list[ChannelGroup], limit: int = 12) -> str:
    names = [g.name for g in groups]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "(none)"


class _UnionFind:
    """Channel classes; roots carry nothing, per-class facts are merged when groups are built."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, count: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return list(range(start, start + count))

    def find(self, c: int) -> int:
        root = c
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[c] != root:  # path compression keeps long residual chains cheap
            self.parent[c], c = root, self.parent[c]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the older class stays root, so roots are stable in graph order
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class _Walk:
    """Everything recorded while propagating slots through the graph."""

    classes: _UnionFind = field(default_factory=_UnionFind)
    slots: dict[fx.Node, list[int]] = field(default_factory=dict)
    frozen: dict[int, str] = field(default_factory=dict)          # class -> first reason
    residual: set[int] = field(default_factory=set)
    events: list[tuple[int, int, str]] = field(default_factory=list)  # (class, node order, path-op label)
    producers: dict[str, tuple[int, list[int], list[int]]] = field(default_factory=dict)  # order, in, out
    passthrough: dict[str, tuple[int, list[int]]] = field(default_factory=dict)
    shortcuts: dict[str, tuple[int, list[int], list[int]]] = field(default_factory=dict)
    macs: dict[str, int] = field(default_factory=dict)
    bn_after: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def fresh(self, count: int, frozen_reason: str | None = None) -> list[int]:
        ids = self.classes.new(count)
        if frozen_reason:
            for c in ids:
                self.frozen[c] = frozen_reason
        return ids

    def freeze(self, ids: list[int], reason: str) -> None:
        for c in ids:
            self.frozen.setdefault(c, reason)


def analyze(model: nn.Module, example_input: torch.Tensor) -> Analysis:
    """Trace `model` on `example_input` and return its channel groups. Never raises for untraceable models:
    they come back with no groups and a warning (nothing will be pruned)."""
    try:
        gm = trace_with_shapes(model, example_input)
    except TraceFailure as exc:
        return Analysis(groups=[], warnings=[f"{exc}; the whole model is treated as unprunable"])
    walk = _propagate(gm)
    groups, members = _build_groups(walk, dict(gm.named_modules()))
    order = list(dict.fromkeys(str(n.target) for n in gm.graph.nodes if n.op == "call_module"))
    return Analysis(groups=groups, warnings=walk.warnings + _unused_warnings(model, gm), bn_after=walk.bn_after,
                    module_order=order, _members=members)


def nothing_pruned_notice(analysis: Analysis, *, include_residual: bool = False, limit: int = 280) -> str:
    """One line for a build that was asked to prune but pruned nothing: why, naming the widest group's reason."""
    prunable = [g for g in analysis.groups if g.prunable]
    if prunable and not include_residual and all(g.residual for g in prunable):
        text = (f"nothing was pruned: the model's {len(prunable)} prunable channel groups are all tied across "
                "residual adds, which are pruned only with advanced.compress.prune.include_residual=true")
    elif prunable:
        text = (f"nothing was pruned: the recipe's ratios, exclude patterns and channel rounding keep every channel "
                f"of the {len(prunable)} prunable channel groups")
    elif not analysis.groups:
        first = analysis.warnings[0] if analysis.warnings else "no conv or Linear produces a channel tensor"
        text = f"nothing was pruned: no channel groups were found ({first})"
    else:
        widest = max(analysis.groups, key=lambda g: g.channels)
        text = (f"nothing was pruned: none of the model's {len(analysis.groups)} channel groups is prunable "
                f"(the widest, '{widest.name}', {widest.channels} channels: {widest.reason})")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def partly_pruned_notice(analysis: Analysis, *, limit: int = 280) -> str | None:
    """One line for a build that pruned some groups while others are frozen at ops the pruner cannot resize
    (grouped convolutions, channel shuffles, flattens into a Linear), naming the first such op; None if none are."""
    held = [g for g in analysis.groups if not g.prunable and "boundary '" in g.reason]
    boundaries = [w for w in analysis.warnings if w.startswith("boundary at node ")]
    if not held or not boundaries:
        return None
    example = boundaries[0][len("boundary at node "):].split("; the channels around it")[0]
    text = (f"not pruned: {len(held)} of {len(analysis.groups)} channel groups, held by {len(boundaries)} "
            f"op{'s' if len(boundaries) > 1 else ''} the pruner cannot resize, e.g. {example}; "
            "`dfp-deploy inspect` lists each")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _unused_warnings(model: nn.Module, gm: fx.GraphModule) -> list[str]:
    """Submodules whose parameters the traced (eval-mode) forward never reads, e.g. a training-only auxiliary head:
    pruning resizes the tensors they would read but not them, so they no longer fit the pruned model."""
    used: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            used.add(str(node.target))
        elif node.op == "call_module":
            used.update(f"{node.target}.{p}" for p, _ in gm.get_submodule(str(node.target)).named_parameters())
    unused = [name for name, _ in model.named_parameters() if name not in used]
    if not unused:
        return []
    every, dead = [name for name, _ in model.named_parameters()], set(unused)
    owners: dict[str, int] = {}
    for name in unused:
        parts = name.split(".")[:-1]
        # the outermost module all of whose parameters are unused names the dead branch
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth]) + "."
            if all(p in dead for p in every if p.startswith(prefix)):
                owners[prefix[:-1]] = owners.get(prefix[:-1], 0) + 1
                break
        else:
            owners[name] = owners.get(name, 0) + 1
    names = list(owners)
    shown = ", ".join(names[:_MAX_REASONS]) + (f" and {len(names) - _MAX_REASONS} more" if len(names) > _MAX_REASONS
                                                else "")
    return [f"submodule(s) {shown} never run in eval mode ({len(unused)} parameter tensors): pruning does not "
            "resize them, so they will not fit the pruned model; remove them (e.g. a training-only auxiliary "
            "head) before building"]


# --- propagation -----------------------------------------------------------------------------------------------

def _propagate(gm: fx.GraphModule) -> _Walk:
    walk = _Walk()
    modules = dict(gm.named_modules())
    counts = call_counts(gm)
    for order, node in enumerate(gm.graph.nodes):
        op = describe_node(node, modules, counts)
        try:
            _apply(walk, node, op, order, modules)
        except Exception as exc:  # an inconsistent graph costs a boundary, never a crash
            _apply_boundary(walk, node, f"analysis failed on this node ({type(exc).__name__}: {exc})")
        if has_channels(node) and node not in walk.slots:
            walk.slots[node] = walk.fresh(shape_of(node)[1], f"output of '{node.name}' is not tracked")
    _record_bn_after(walk, gm, modules)
    return walk


def _input_slots(walk: _Walk, node) -> list[int]:
    if node not in walk.slots:
        raise ValueError(f"input '{node}' carries no channel slots")
    return walk.slots[node]


def _apply(walk: _Walk, node: fx.Node, op: NodeOp, order: int, modules: dict[str, nn.Module]) -> None:
    action = op.action
    out_shape = shape_of(node)
    if action == "input":
        if has_channels(node):
            walk.slots[node] = walk.fresh(out_shape[1], "model input")
    elif action == "output":
        for arg in node.all_input_nodes:
            if arg in walk.slots:
                walk.freeze(walk.slots[arg], "reaches the model output")
    elif action == "ignore":
        pass
    elif action == "constant":
        if has_channels(node):
            walk.slots[node] = walk.fresh(out_shape[1], op.reason)
    elif action == "boundary":
        _apply_boundary(walk, node, op.reason)
    elif action == "producer":
        _apply_producer(walk, node, order, modules[str(node.target)])
    elif action in ("pass", "bn", "depthwise"):
        slots = _input_slots(walk, node.args[0])
        if out_shape is None or len(out_shape) < 2 or out_shape[1] != len(slots):
            raise ValueError("channel count changed across a pass-through op")
        walk.slots[node] = slots
        _record_events(walk, slots, order, op.label)
        if action != "pass":
            name = str(node.target)
            walk.passthrough[name] = (order, list(slots))
            walk.macs[name] = module_macs(modules[name], shape_of(node.args[0]), out_shape)
    elif action == "elementwise":
        _apply_elementwise(walk, node, op, order)
    elif action == "cat":
        slots = [c for operand in op.operands for c in _input_slots(walk, operand)]
        if len(slots) != out_shape[1]:
            raise ValueError("cat output channels do not add up")
        walk.slots[node] = slots
        _record_events(walk, slots, order, op.label)
    elif action in ("pad", "shortcut"):
        _apply_channel_pad(walk, node, op, order)
    else:
        raise ValueError(f"unknown action {action}")


def _apply_boundary(walk: _Walk, node: fx.Node, reason: str) -> None:
    for arg in node.all_input_nodes:
        if arg in walk.slots:
            walk.freeze(walk.slots[arg], f"feeds boundary '{node.name}' ({reason})")
    if has_channels(node):
        walk.slots[node] = walk.fresh(shape_of(node)[1], f"comes out of boundary '{node.name}'")
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
    walk.warnings.append(f"boundary at node '{node.name}' (target {target}): {reason}; the channels around it "
                         "will not be pruned")


def _apply_producer(walk: _Walk, node: fx.Node, order: int, module: nn.Module) -> None:
    in_slots = _input_slots(walk, node.args[0])
    out_shape = shape_of(node)
    out = walk.fresh(out_shape[1])
    walk.slots[node] = out
    name = str(node.target)
    walk.producers[name] = (order, list(in_slots), out)
    walk.macs[name] = module_macs(module, shape_of(node.args[0]), out_shape)


def _apply_elementwise(walk: _Walk, node: fx.Node, op: NodeOp, order: int) -> None:
    lists = [_input_slots(walk, operand) for operand in op.operands]
    width = shape_of(node)[1]
    if any(len(s) != width for s in lists):
        raise ValueError("operands of an elementwise op have different channel counts")
    for operand in op.freeze:
        if operand in walk.slots:
            walk.freeze(walk.slots[operand], f"broadcast over channels at '{node.name}'")
    for position in range(width):
        for other in lists[1:]:
            walk.classes.union(lists[0][position], other[position])
    if op.residual:
        for slots in lists:
            walk.residual.update(slots)
    walk.slots[node] = list(lists[0])
    for slots in lists:
        _record_events(walk, slots, order, op.label)


def _apply_channel_pad(walk: _Walk, node: fx.Node, op: NodeOp, order: int) -> None:
    inner = _input_slots(walk, node.args[0])
    before_n, after_n = op.pad
    fixed = "zero channels added by F.pad have a size fixed in the model code" if op.action == "pad" else None
    before, after = walk.fresh(before_n, fixed), walk.fresh(after_n, fixed)
    walk.slots[node] = before + list(inner) + after
    if op.action == "shortcut":
        walk.shortcuts[str(node.target)] = (order, before, after)
    _record_events(walk, walk.slots[node], order, op.label)


def _record_events(walk: _Walk, slots: list[int], order: int, label: str) -> None:
    if label:
        walk.events.extend((c, order, label) for c in slots)


def _record_bn_after(walk: _Walk, gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    by_name = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    for name in walk.producers:
        users = list(by_name[name].users)
        if len(users) == 1 and users[0].op == "call_module" and str(users[0].target) in walk.passthrough \
                and isinstance(modules[str(users[0].target)], nn.modules.batchnorm._BatchNorm):
            walk.bn_after[name] = str(users[0].target)


# --- groups ----------------------------------------------------------------------------------------------------

def _build_groups(walk: _Walk, modules: dict[str, nn.Module]) -> tuple[list[ChannelGroup], dict[str, GroupMembers]]:
    find = walk.classes.find
    linked = _UnionFind()
    linked.parent = list(range(len(walk.classes.parent)))
    for _, _, out in walk.producers.values():
        for c in out[1:]:
            linked.union(find(out[0]), find(c))

    component_producers: dict[int, list[str]] = {}
    for name, (_, _, out) in sorted(walk.producers.items(), key=lambda item: item[1][0]):
        component_producers.setdefault(linked.find(find(out[0])), []).append(name)

    facts = _root_facts(walk)
    groups, members = [], {}
    for producers in component_producers.values():
        group, group_members = _one_group(walk, producers, facts, modules)
        groups.append(group)
        members[group.name] = group_members
    return groups, members


@dataclass
class _RootFacts:
    reasons: dict[int, list[str]]
    residual: set[int]
    events: dict[int, list[tuple[int, str]]]


def _root_facts(walk: _Walk) -> _RootFacts:
    find = walk.classes.find
    reasons: dict[int, list[str]] = {}
    for c, reason in sorted(walk.frozen.items()):
        bucket = reasons.setdefault(find(c), [])
        if reason not in bucket:
            bucket.append(reason)
    events: dict[int, list[tuple[int, str]]] = {}
    for c, order, label in walk.events:
        events.setdefault(find(c), []).append((order, label))
    return _RootFacts(reasons, {find(c) for c in walk.residual}, events)


def _one_group(walk: _Walk, producers: list[str], facts: _RootFacts,
               modules: dict[str, nn.Module]) -> tuple[ChannelGroup, GroupMembers]:
    find = walk.classes.find
    canonical = sorted(producers, key=lambda name: (-len(walk.producers[name][2]), walk.producers[name][0]))
    index: dict[int, int] = {}
    for name in canonical:
        for c in walk.producers[name][2]:
            index.setdefault(find(c), len(index))

    def mapping(ids: list[int]) -> list[int]:
        return [index.get(find(c), -1) for c in ids]

    members = GroupMembers(
        producers={name: mapping(walk.producers[name][2]) for name in producers},
        passthrough=_touching({n: s for n, (_, s) in walk.passthrough.items()}, walk.passthrough, mapping),
        consumers=_touching({n: s for n, (_, s, _) in walk.producers.items()}, walk.producers, mapping),
        shortcuts={name: (tuple(mapping(before)), tuple(mapping(after)))
                   for name, (_, before, after) in sorted(walk.shortcuts.items(), key=lambda i: i[1][0])
                   if any(i >= 0 for i in mapping(before) + mapping(after))},
    )
    roots = list(index)
    reasons = [r for root in roots for r in facts.reasons.get(root, [])]
    unique_reasons = list(dict.fromkeys(reasons))
    reason = "; ".join(unique_reasons[:_MAX_REASONS])
    if len(unique_reasons) > _MAX_REASONS:
        reason += f"; and {len(unique_reasons) - _MAX_REASONS} more"
    events = sorted(e for root in roots for e in facts.events.get(root, []))
    touching = [*members.producers, *members.consumers,
                *(n for n in members.passthrough if isinstance(modules[n], nn.modules.conv._ConvNd))]
    group = ChannelGroup(
        name=producers[0],
        channels=len(index),
        producers=tuple(producers),
        consumers=tuple(members.consumers),
        passthrough=tuple(members.passthrough),
        prunable=not reasons,
        reason=reason,
        residual=any(root in facts.residual for root in roots),
        macs=sum(walk.macs.get(n, 0) for n in dict.fromkeys(touching)),
        path_ops=tuple(dict.fromkeys(label for _, label in events)),
    )
    return group, members


def _touching(slots_by_module: dict[str, list[int]], ordered: dict, mapping) -> dict[str, list[int]]:
    """Modules (in graph order) with at least one channel in the group, mapped position by position."""
    result = {}
    for name in sorted(slots_by_module, key=lambda n: ordered[n][0]):
        mapped = mapping(slots_by_module[name])
        if any(i >= 0 for i in mapped):
            result[name] = mapped
    return result
