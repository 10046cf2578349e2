"""The search for ATM's operating point: pure functions of a scoring callable, no data, no model.

The search space is one-dimensional per schedule *shape*. A shape fixes ``split_layer``, the block
where the threshold decays to its floor (``decay_layer``) and how far block 1's threshold sits below
1 (``alpha_drop``). The *level* is the gap ``1 - theta_min``; ``alpha = 1 - alpha_drop * gap`` and
``beta = ln(1 + alpha - theta_min) / (decay_layer - 1)`` follow from it, so every block's threshold
falls as the gap grows and the FLOPs reduction rises with it. The level is solved in log space
(pretrained ViTs want gaps near 0.2, random ones near 0.005) by secant steps, for a few shapes; the
point with the lowest KL among those within the tolerance of the target wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from ..merge import ATM

# Bounds of the level, log(1 - theta_min): theta_min from 0.99999 (nearly nothing merges) to -1
# (every source merges once the threshold has decayed).
LOG_GAP_BOUNDS = (math.log(1e-5), math.log(2.0))
FIRST_LOG_GAP = math.log(0.2)  # where pretrained ViTs land for ~30 % reduction
FIRST_SLOPE = 0.3  # reduction gained per unit of log gap, ViT-Ti near 30 %


@dataclass(frozen=True)
class Shape:
    """A schedule family: everything but the level."""

    split_layer: int  # first block (1-indexed) with the size-sorted split
    decay_layer: int  # block (1-indexed) whose threshold first reaches theta_min
    alpha_drop: float  # alpha = 1 - alpha_drop * gap: 0 keeps block 1 strict, more merges there too

    def merger(self, log_gap: float, base: ATM) -> ATM:
        """``base`` (its batch rule and proportional attention kept) at this shape and level
        ``log_gap``, rounded to readable values."""
        gap = math.exp(log_gap)
        alpha = round(1.0 - self.alpha_drop * gap, 5)
        theta_min = min(alpha, round(1.0 - gap, 5))
        beta = max(0.0, float(f"{math.log(1.0 + alpha - theta_min) / (self.decay_layer - 1):.4g}"))
        return replace(base, alpha=alpha, beta=beta, theta_min=theta_min, split_layer=self.split_layer)



@dataclass(frozen=True)
class Point:
    """One evaluated schedule on the calibration images."""

    merger: ATM
    reduction: float  # fraction of dense GFLOPs saved
    kl: float  # mean KL(dense || merged) in nats
    agreement: float  # fraction of images whose top-1 class is unchanged
    top1: float | None  # fraction correct, with use_labels
    rerun: float = 0.0  # fraction of the images run again unmerged (the merger's rerun_margin)

    def describe(self) -> str:
        m = self.merger
        rerun = f" rerun_margin={m.rerun_margin:.4g}" if m.rerun_margin > 0 else ""
        text = (
            f"alpha={m.alpha:.5g} beta={m.beta:.4g} theta_min={m.theta_min:.5g} split_layer={m.split_layer}{rerun}: "
            f"reduction {100 * self.reduction:.1f}%  KL {self.kl:.4f}  agreement {100 * self.agreement:.1f}%"
        )
        if m.rerun_margin > 0:
            text += f"  rerun {100 * self.rerun:.1f}%"
        return text + (f"  top-1 {100 * self.top1:.1f}%" if self.top1 is not None else "")


@dataclass
class Calibration:
    """Every point the search evaluated and the one it chose, with the dense model on the same images."""

    target: float
    tolerance: float
    points: list[Point] = field(default_factory=list)
    best: Point | None = None
    num_images: int = 0
    dense_gflops: float | None = None
    dense_top1: float | None = None  # with use_labels


def solve_level(
    error: Callable[[float], float], start: float, slope: float, tolerance: float, max_evals: int
) -> tuple[float, float] | None:
    """A level ``x`` with ``|error(x)| <= tolerance`` and the local slope there, or None when the
    target is out of reach or the evaluations run out.

    ``error`` rises with ``x`` (approximately: merging changes what later blocks see). Secant steps,
    starting from the prior ``slope``, find the root in two or three evaluations on the smooth
    reduction curve; once the root is bracketed, interpolation is kept away from the bracket's ends
    so that a curved stretch cannot stall it.
    """
    low, high = LOG_GAP_BOUNDS
    seen: list[tuple[float, float]] = []
    x = start
    while len(seen) < max_evals:
        f = error(x)
        seen.append((x, f))
        if len(seen) >= 2:
            (x0, f0), (x1, f1) = seen[-2:]
            if x1 != x0 and (f1 - f0) / (x1 - x0) > 0:
                slope = (f1 - f0) / (x1 - x0)
        if abs(f) <= tolerance:
            return x, slope
        below = [p for p in seen if p[1] < 0]
        above = [p for p in seen if p[1] > 0]
        if below and above:
            (xa, fa), (xb, fb) = max(below), min(above)
            t = min(0.9, max(0.1, -fa / (fb - fa)))
            x = xa + t * (xb - xa)
        elif (x == high and f < 0) or (x == low and f > 0):
            return None  # the target lies past the end of the range
        else:
            x = min(high, max(low, x - max(-2.0, min(2.0, f / slope))))
    return None


def search(
    score: Callable[[ATM], Point],
    shapes: Iterable[Shape],
    base: ATM,
    target: float,
    tolerance: float,
    max_evals: int,
    use_labels: bool,
) -> Calibration:
    """Solve the level of each shape for ``target`` and keep the best point within ``tolerance``.

    Best means lowest KL; with labels, highest top-1 and then lowest KL. Each shape starts from the
    previous shape's level and slope: the shapes lie on one curve, so their levels are close.
    """
    result = Calibration(target, tolerance)
    start, slope = FIRST_LOG_GAP, FIRST_SLOPE
    for shape in shapes:

        def error(log_gap: float, shape: Shape = shape) -> float:
            point = score(shape.merger(log_gap, base))
            result.points.append(point)
            return point.reduction - target

        solved = solve_level(error, start, slope, tolerance, max_evals)
        if solved is not None:
            start, slope = solved
    hits = [p for p in result.points if abs(p.reduction - target) <= tolerance]
    if hits:
        key = (lambda p: (-p.top1, p.kl)) if use_labels else (lambda p: p.kl)
        result.best = min(hits, key=key)
    return result


def candidate_shapes(
    depth: int,
    split_layers: list[int] | None = None,
    decay_layers: list[int] | None = None,
    alpha_drops: list[float] | None = None,
    strict_first_block: bool = False,
) -> list[Shape]:
    """The grid of schedule shapes; each axis defaults to values that mattered on ViT-Ti and DeiT.

    Split layers near the end (depth-2, depth-1), the threshold reaching its floor at depth-2, and
    block 1 strict or merging near-duplicates (alpha_drop 0, 0.5): four shapes. On ViT-Ti the
    decay layer and alpha barely move the KL-vs-reduction curve; on images with blank background
    merging duplicates in block 1 is what keeps high reductions lossless. ``strict_first_block``
    drops alpha_drop 0.5 from the default: with class-attention weighting it changed ViT-Ti's
    predictions ten times more at the same saving, and its evaluations doubled the search time.
    """
    splits = split_layers or sorted({max(1, depth - 2), max(1, depth - 1)})
    decays = decay_layers or [max(2, depth - 2)]
    drops = alpha_drops or ([0.0] if strict_first_block else [0.0, 0.5])
    bad = [d for d in decays if not 2 <= d <= depth] + [s for s in splits if not 1 <= s <= depth + 1]
    if bad or not all(0.0 <= a < 1.0 for a in drops):
        raise ValueError(
            f"--split_layers must lie in 1..{depth + 1}, --decay_layers in 2..{depth} for this "
            f"{depth}-block model, and --alpha_drops in [0, 1); got {split_layers}, {decay_layers}, {alpha_drops}"
        )
    return [Shape(s, d, a) for a in drops for s in splits for d in decays]


def unreached_message(result: Calibration) -> str:
    """Why no point qualified, with the reductions seen, and the fix that can work.

    When the strongest schedule (theta_min -1: every source merges once the threshold has decayed)
    still saves too little, or the weakest (theta_min 0.99999) already too much, no number of
    evaluations or tolerance helps: only another target does.
    """
    seen = sorted(p.reduction for p in result.points)
    span = f"{100 * seen[0]:.1f}%..{100 * seen[-1]:.1f}%" if seen else "none"
    unreached = (
        f"no schedule came within {100 * result.tolerance:.1f} pp of the target {100 * result.target:.1f}% "
        f"(reductions seen: {span})"
    )
    strongest = [p.reduction for p in result.points if _level_of(p) >= LOG_GAP_BOUNDS[1] - 1e-9]
    weakest = [p.reduction for p in result.points if _level_of(p) <= LOG_GAP_BOUNDS[0] + 1e-9]
    if strongest and max(seen) < result.target - result.tolerance:
        return (
            f"{unreached}; even the strongest schedule (theta_min -1) saves only {100 * max(seen):.1f}% "
            f"on these images with these --split_layers/--decay_layers/--alpha_drops, so choose "
            f"--target_reduction {math.floor(1000 * max(seen)) / 1000:g} or less"
        )
    if weakest and min(seen) > result.target + result.tolerance:
        return (
            f"{unreached}; even the weakest schedule (theta_min 0.99999) saves {100 * min(seen):.1f}%, "
            f"so choose --target_reduction {math.ceil(1000 * min(seen)) / 1000:g} or more"
        )
    return f"{unreached}; raise --max_evals or --tolerance, or choose another --target_reduction"


def _level_of(point: Point) -> float:
    """The point's level, log(1 - theta_min), as :meth:`Shape.merger` set it."""
    return math.log(max(1e-12, 1.0 - point.merger.theta_min))


