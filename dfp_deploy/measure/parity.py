"""Parity of an engine against a reference (the PyTorch model), and the precision-aware rule that judges it.

With reference logits R and engine logits E (n x k):
  max_abs_err  = max_ij |E_ij - R_ij|      (infinite if either side produced NaN/inf)
  mean_abs_err = mean_ij |E_ij - R_ij|
  top1_agreement = (1/n) * |{i : argmax_j E_ij == argmax_j R_ij}|   (a fraction in [0, 1])
  ref_scale    = s = max_ij |R_ij|

The rule (derived in docs/methods/parity_tolerance.md) for an engine computing in arithmetic p with unit roundoff
u_p, on a network of L conv/linear layers whose longest dot product has K terms:
  rel_tol(p) = 2 * sqrt(r_p * L) * u_p    r_fp16 = 3 (input, weight, output rounded), r_tf32 = 2 (input, weight)
  rel_tol(fp32) = 2 * sqrt(2 * K * L) * u_fp32                  (two summation orders, Higham-Mary sqrt(K) growth)
  tolerance = max(abs_floor, rel_tol * s)          pass when max_abs_err <= tolerance
  fp16/tf32 also: every sample whose reference top-1 margin exceeds 2 * rel_tol * s keeps its class.

Several outputs (a detector's boxes and scores): each output o is judged alone with its own s_o = max|R_o|, so a
small-valued head is not excused by a large one. A pass is uninformative when tolerance >= 0.1 * s (an engine off by
a tenth of every value passes; at tolerance >= s one returning zeros does): such outputs are flagged, not failed.

int8 engines against their simulated quantization S (the same Q/DQ graph run as float ops), output by output:
  rel_rms = sqrt(mean (E - S)^2) / sqrt(mean S^2)      pass when rel_rms <= INT8_MAX_REL_RMS
The integer kernels only round some values to the neighbouring step of the same grid; an output that is zeros
(rel_rms = 1), rescaled, shifted or permuted is not the graph's (docs/methods/parity_tolerance.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dfp_deploy.core.errors import ParityError
from dfp_deploy.core.outputs import SINGLE_OUTPUT, as_named

UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "tf32": 2.0 ** -11, "fp16": 2.0 ** -11}  # 23, 10, 10 explicit mantissa bits
ROUNDINGS_PER_LAYER = {"fp16": 3, "tf32": 2}
SIGMAS = 2.0  # the rule's allowance over the random-walk estimate (the doc's emulation shows 3-10x headroom)
SCALE_TOO_SMALL = 1e-6  # below this max|R| the reference is ~0 (the flag for int8, which has no tolerance)
# a pass proves little once the tolerance reaches this fraction of max|R| (an engine that is off by that much
# everywhere passes; at a tolerance >= max|R| one that returns zeros does): such outputs are flagged
UNINFORMATIVE_FRACTION = 0.1
# int8 engine vs its simulated quantization: the largest RMS error, as a fraction of the output's RMS, still taken
# for requantization rounding (correct engines: 0 to ~0.1 on the random-weight zoo; an output of zeros is 1.0)
INT8_MAX_REL_RMS = 0.5


@dataclass(frozen=True)
class ParityRule:
    """What the engine computes in ("fp32", "tf32", "fp16") and the network's size; abs_floor: the recipe's bound."""

    arithmetic: str
    layers: int
    max_dot: int
    abs_floor: float

    def __post_init__(self):
        if self.arithmetic not in UNIT_ROUNDOFF:
            raise ValueError(f"parity rule: arithmetic {self.arithmetic!r} is not one of {', '.join(UNIT_ROUNDOFF)}")

    @property
    def rel_tolerance(self) -> float:
        return relative_tolerance(self.arithmetic, self.layers, self.max_dot)


def relative_tolerance(arithmetic: str, layers: int, max_dot: int) -> float:
    """rel_tol of the module docstring: the allowed max|E - R| as a fraction of max|R|."""
    u, layers, max_dot = UNIT_ROUNDOFF[arithmetic], max(1, int(layers)), max(1, int(max_dot))
    if arithmetic == "fp32":
        return SIGMAS * math.sqrt(2 * max_dot * layers) * u
    return SIGMAS * math.sqrt(ROUNDINGS_PER_LAYER[arithmetic] * layers) * u


def network_size(model) -> tuple[int, int]:
    """(L, K): how many Conv/Linear layers `model` has and the length of its longest dot product."""
    from torch import nn

    layers, max_dot = 0, 1
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            k = module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            k = module.in_features
        else:
            continue
        layers, max_dot = layers + 1, max(max_dot, k)
    return layers, max_dot


def _judge(rule: ParityRule, result: dict, expected: np.ndarray, actual: np.ndarray, *, decisions: bool = True,
           label: str = "the logits") -> dict:
    scale = result["ref_scale"]
    rel = rule.rel_tolerance
    tolerance = max(rule.abs_floor, rel * scale) if math.isfinite(scale) else rule.abs_floor
    verdict = {"arithmetic": rule.arithmetic, "layers": rule.layers, "max_dot": rule.max_dot,
               "unit_roundoff": UNIT_ROUNDOFF[rule.arithmetic], "rel_tolerance": rel, "abs_floor": rule.abs_floor,
               "tolerance": tolerance,
               "rel_err": result["max_abs_err"] / scale if scale > 0 else float("inf"),
               "formula": "max|E-R| <= max(abs_floor, rel_tolerance * max|R|)", "warnings": []}
    failures = []
    if not result["max_abs_err"] <= tolerance:
        failures.append(f"engine and PyTorch differ by {result['max_abs_err']:.3g} on {label} (> tolerance "
                        f"{tolerance:.3g} = max(advanced.measure.parity_tolerance {rule.abs_floor:g}, {rel:.3g} x "
                        f"max|R| {scale:.3g}) for {rule.arithmetic} arithmetic)")
    if decisions and rule.arithmetic in ROUNDINGS_PER_LAYER and len(expected) and math.isfinite(scale):
        # decided against rel_tol alone, so raising the recipe's abs_floor cannot hide a changed decision
        flat_e, flat_a = expected.reshape(len(expected), -1), actual.reshape(len(actual), -1)
        top2 = np.sort(flat_e, axis=1)[:, -2:] if flat_e.shape[1] > 1 else np.zeros((len(flat_e), 2))
        decisive = (top2[:, 1] - top2[:, 0]) > 2 * rel * scale
        changed = decisive & (flat_e.argmax(axis=1) != flat_a.argmax(axis=1))
        verdict.update(decisive_samples=int(decisive.sum()), decisive_changed=int(changed.sum()),
                       near_ties=int((~decisive).sum()))
        if changed.any():
            failures.append(f"{int(changed.sum())} of {int(decisive.sum())} inputs whose top-1 margin exceeds "
                            f"2 x {rel:.3g} x max|logit| changed their predicted class")
    warning = _uninformative(label, scale, tolerance)
    if warning:
        verdict["warnings"].append(warning)
    verdict["passed"] = not failures
    verdict["failure"] = "; ".join(failures) or None
    return verdict


def informative(scale: float, tolerance: float | None) -> bool:
    """Whether a pass says anything: the tolerance is below UNINFORMATIVE_FRACTION of the output's scale (with no
    tolerance, int8, the scale is at least SCALE_TOO_SMALL)."""
    if not math.isfinite(scale):
        return True  # a NaN/inf reference fails parity by itself
    if tolerance is None:
        return scale >= SCALE_TOO_SMALL
    return tolerance < UNINFORMATIVE_FRACTION * scale


def _uninformative(label: str, scale: float, tolerance: float | None) -> str | None:
    if informative(scale, tolerance):
        return None
    bound = (f"is at most {1 / UNINFORMATIVE_FRACTION:g}x the tolerance {tolerance:.3g}, so an engine off by "
             f"{100 * UNINFORMATIVE_FRACTION:g} % of every value would pass"
             if tolerance is not None else f"is below {SCALE_TOO_SMALL:g}")
    return (f"parity: max|R| of {label} is {scale:.3g}, which {bound}: the parity check cannot tell a right engine "
            "from a wrong one here (give the model its trained weights, or weights whose outputs are not ~0)")


def _compare(expected: np.ndarray, actual: np.ndarray) -> dict:
    """The numbers of one output: max/mean |E - R| (infinite on NaN/inf), nonfinite count, scale max|R|."""
    nonfinite = int((~np.isfinite(expected)).sum() + (~np.isfinite(actual)).sum())
    diff = np.abs(actual - expected)
    if nonfinite:
        max_err = mean_err = float("inf")
    elif diff.size == 0:
        max_err = mean_err = 0.0
    else:
        max_err, mean_err = float(diff.max()), float(diff.mean())
    finite_ref = expected[np.isfinite(expected)]
    scale = float(np.abs(finite_ref).max()) if finite_ref.size else 0.0
    return {"max_abs_err": max_err, "mean_abs_err": mean_err, "nonfinite": nonfinite, "ref_scale": scale,
            "rel_rms": relative_rms(expected, actual), "size": int(expected.size)}


def relative_rms(expected: np.ndarray, actual: np.ndarray) -> float:
    """sqrt(mean (A - E)^2) / sqrt(mean E^2): 0 for equal arrays, 1 for zeros in place of E; infinite on NaN/inf
    or when E is all zeros and A is not."""
    if expected.size == 0:
        return 0.0
    if not (np.isfinite(expected).all() and np.isfinite(actual).all()):
        return float("inf")
    err = float(np.sqrt(np.mean(np.square(actual - expected))))
    ref = float(np.sqrt(np.mean(np.square(expected))))
    return err / ref if ref > 0 else (0.0 if err == 0 else float("inf"))


def _agreement(expected: np.ndarray, actual: np.ndarray) -> float:
    flat_e, flat_a = expected.reshape(len(expected), -1), actual.reshape(len(actual), -1)
    return float(np.mean(flat_e.argmax(axis=1) == flat_a.argmax(axis=1))) if len(expected) else 1.0


def parity(reference: Callable[[np.ndarray], np.ndarray], engine, inputs: np.ndarray,
           rule: ParityRule | None = None) -> dict:
    """Compare `engine.run(inputs)` with `reference(inputs)`: {"max_abs_err", "mean_abs_err", "top1_agreement", "n"}.

    Also "nonfinite": how many engine or reference outputs were NaN or infinite (the errors are then infinite),
    "ref_scale" (max|R|), "outputs" (each output's numbers and, with a rule, its tolerance and verdict, judged
    relative to that output's own scale), "warnings" (outputs too small for parity to mean anything), and with a
    `rule` its verdict under "rule" (check it with `enforce`). A model with several outputs (core/outputs.py) is
    judged output by output; the top-level numbers are the worst over outputs and top1_agreement is None (a class
    decision is defined for one logits output only).
    """
    inputs = np.asarray(inputs, dtype=np.float32)
    expected = {k: np.asarray(v, dtype=np.float64) for k, v in as_named(reference(inputs)).items()}
    actual = {k: np.asarray(v, dtype=np.float64) for k, v in as_named(engine.run(inputs)).items()}
    name = getattr(engine, "name", "engine")
    if list(expected) != list(actual):
        raise ParityError(f"parity: {name} returned outputs {list(actual)}, the reference {list(expected)}")
    for key in expected:
        if expected[key].shape != actual[key].shape:
            shown = "" if len(expected) == 1 else f" for output {key!r}"
            raise ParityError(f"parity: {name} returned shape {actual[key].shape}{shown}, the reference "
                              f"{expected[key].shape}")
    single = len(expected) == 1 and SINGLE_OUTPUT in expected
    outputs = {key: _compare(expected[key], actual[key]) for key in expected}
    total = sum(o["size"] for o in outputs.values())
    result = {"max_abs_err": max(o["max_abs_err"] for o in outputs.values()),
              "mean_abs_err": (float("inf") if any(o["nonfinite"] for o in outputs.values()) else
                               sum(o["mean_abs_err"] * o["size"] for o in outputs.values()) / total if total else 0.0),
              "top1_agreement": _agreement(expected[SINGLE_OUTPUT], actual[SINGLE_OUTPUT]) if single else None,
              "n": int(len(inputs)), "nonfinite": sum(o["nonfinite"] for o in outputs.values()),
              "ref_scale": max(o["ref_scale"] for o in outputs.values())}
    verdicts, warnings = {}, []
    for key, out in outputs.items():
        label = "the logits" if single else f"output {key!r}"
        if rule is not None:
            verdicts[key] = verdict = _judge(rule, out, expected[key], actual[key], decisions=single, label=label)
            out.update(tolerance=verdict["tolerance"], rel_err=verdict["rel_err"], passed=verdict["passed"])
            warning = verdict["warnings"][0] if verdict["warnings"] else None
        else:
            out["rel_err"] = out["max_abs_err"] / out["ref_scale"] if out["ref_scale"] > 0 else float("inf")
            warning = _uninformative(label, out["ref_scale"], None)
        out["scale"] = out.pop("ref_scale")
        del out["size"]
        out["informative"] = warning is None
        warnings += [warning] if warning else []
    result.update(outputs=outputs, warnings=warnings)
    if rule is not None:
        result["rule"] = verdicts[SINGLE_OUTPUT] if single else _combine(rule, verdicts)
    return result


def _combine(rule: ParityRule, verdicts: dict[str, dict]) -> dict:
    """One verdict over several outputs: passed when every output passed; tolerances are per output."""
    failures = [f"output {key!r}: {v['failure']}" for key, v in verdicts.items() if not v["passed"]]
    return {"arithmetic": rule.arithmetic, "layers": rule.layers, "max_dot": rule.max_dot,
            "unit_roundoff": UNIT_ROUNDOFF[rule.arithmetic], "rel_tolerance": rule.rel_tolerance,
            "abs_floor": rule.abs_floor, "tolerance": None, "per_output": True,
            "formula": "every output: max|E-R| <= max(abs_floor, rel_tolerance * max|R| of that output)",
            "warnings": [w for v in verdicts.values() for w in v["warnings"]],
            "passed": not failures, "failure": "; ".join(failures) or None}


def int8_verdict(simulated: dict) -> dict:
    """The int8 gate on parity(simulation, engine): every informative output within INT8_MAX_REL_RMS of its own
    RMS (module docstring). Outputs whose reference is ~0 are flagged by parity() and not judged here."""
    single = list(simulated["outputs"]) == [SINGLE_OUTPUT]
    bad = {key: out["rel_rms"] for key, out in simulated["outputs"].items()
           if out["informative"] and not out["rel_rms"] <= INT8_MAX_REL_RMS}
    failure = None
    if bad:
        named = ("its logits" if single else
                 ("output " if len(bad) == 1 else "outputs ") + ", ".join(f"{k!r}" for k in list(bad)[:3])
                 + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
        failure = (f"the int8 engine differs from its simulated quantization on {named} by "
                   f"{max(bad.values()):.3g} x the output's RMS (> {INT8_MAX_REL_RMS:g}, more than requantization "
                   "rounding): the engine does not compute its Q/DQ graph")
    return {"formula": "every output: rms(E-S) <= max_rel_rms * rms(S), S = the simulated quantization",
            "max_rel_rms": INT8_MAX_REL_RMS, "passed": not bad, "failure": failure}


def enforce(result: dict) -> None:
    """ParityError with the rule's one-line reason when `result` (from parity(..., rule=...)) failed it."""
    verdict = result.get("rule")
    if verdict is not None and not verdict["passed"]:
        raise ParityError(f"parity: {verdict['failure']}")
