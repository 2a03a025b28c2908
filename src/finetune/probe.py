"""The linear probe solved to convergence: multinomial logistic regression on frozen features.

The standard linear-evaluation protocol (Kornblith et al. 2019, "Do Better ImageNet Models
Transfer Better?"; Ericsson et al. 2021, "How Well Do Self-Supervised Models Transfer?"): the
backbone's pooled features of the un-augmented images (the caller may add those of augmented
views, `finetune.features.augmented_views`), a full-batch L-BFGS solve of

    mean cross-entropy(W x + b, y) + (l2 / 2) * ||W||^2     (the bias is not penalised)

for each L2 strength of a log-spaced grid, the strength chosen on validation by the metric that
picks the best checkpoint (`selection.metric`: accuracy, balanced accuracy or macro-F1; ties: the
lower validation loss, then the stronger L2). A choice at an edge of the grid grows the grid past
that edge, a step at a time (at most `MAX_GRID_EXTENSIONS`), until it is inside. The cross-entropy
is the one gradient training
uses (its label smoothing and class weights): one loss for the head however it is trained,
whose optimum the solve finds. The features are standardised with the training
split's mean and standard deviation before the solve (it converges in far fewer iterations) and
the solution is folded back into an `nn.Linear` over the raw features, so the network's head
computes exactly the solved classifier.

The grid is walked from the strongest to the weakest L2, each solve starting from the previous
solution (a warm-started regularisation path): the weak-L2 solves, which need the most
iterations from zero, start close to their optimum.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from finetune.heads import affine_parts
from finetune.progress import progress

log = logging.getLogger(__name__)

# L2 strengths tried, strongest first: 1e1 down to 1e-5, two per decade. With standardised
# features the useful range of the mean-loss objective sits well inside it (Flowers102 with
# efficientnet_lite0 peaks near 1e-4; below 1e-5 the path no longer moves).
L2_GRID = tuple(10.0 ** (1 - k / 2) for k in range(13))
# The most strengths added past an edge of the grid when the choice sits on it (two decades).
MAX_GRID_EXTENSIONS = 4
MAX_ITERATIONS = 500  # L-BFGS iterations per grid point; a solve stops earlier at convergence
# Stop when the largest gradient entry is below this (the objective is a mean, so its scale
# does not grow with the dataset).
GRADIENT_TOLERANCE = 1e-6


@dataclass
class ProbeSolution:
    """The solved head over raw features and how it was chosen.

    weight: (classes, features); bias: (classes,); l2: the chosen strength; val_acc, val_loss:
    its validation accuracy and mean cross-entropy (None without validation images); path:
    per grid point, the l2, its validation accuracy, balanced accuracy, macro-F1 and loss and
    the L-BFGS iterations it took; seconds: the whole solve; selection: the validation metric
    that chose the strength; val_scores: the chosen strength's balanced accuracy and macro-F1
    (`val_balanced_acc`, `val_macro_f1`; empty without validation images).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    val_acc: float | None
    path: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    val_loss: float | None = None
    # The training features' mean and standard deviation (D,), for a head with its own norm.
    feature_mean: torch.Tensor | None = None
    feature_std: torch.Tensor | None = None
    selection: str = "val/acc"
    val_scores: dict[str, float] = field(default_factory=dict)
    at_edge: bool = False  # the chosen l2 is still the grid's strongest or weakest

    def report(self) -> dict[str, object]:
        """The part of metrics.json that says how the head was solved."""
        return {
            "probe_l2": self.l2,
            "probe_l2_at_edge": self.at_edge,
            "probe_selected_by": self.selection,
            "probe_val_acc": self.val_acc,
            **{f"probe_{name}": self.val_scores.get(name) for name in PER_CLASS_MEANS},
            "probe_val_loss": self.val_loss,
            "probe_seconds": round(self.seconds, 2),
            "probe_path": self.path,
        }

    def copy_into(self, head: nn.Module | tuple[nn.Module, ...]) -> None:
        """Make `head` compute this classifier of the raw features (shapes must match).

        `head` is a network's classifier (`Network.get_classifier()`): an `nn.Linear`; a 1x1
        `nn.Conv2d` (weights reshaped); a `BatchNorm1d` followed by a Linear (LeViT's
        `NormLinear`), whose norm takes the training features' mean and variance (the
        statistics its batches will show, so a training-mode forward computes nearly the
        same classifier) with unit scale and no shift, and whose Linear the classifier is
        folded into so that the eval-mode head computes it exactly; or a tuple of such
        classifiers, whose logits the network averages: each gets the whole solution.
        """
        for classifier in head if isinstance(head, tuple | list) else (head,):
            norm, affine = affine_parts(classifier)
            weight, bias = self.weight, self.bias
            with torch.no_grad():
                if norm is not None:
                    if self.feature_mean is not None and self.feature_std is not None:
                        norm.running_mean.copy_(self.feature_mean)
                        norm.running_var.copy_(self.feature_std.pow(2))
                    if norm.affine:
                        norm.weight.fill_(1.0)
                        norm.bias.zero_()
                    # norm(x) = (x - m) / s with s = sqrt(var + eps): W x + b = (W s) norm(x)
                    # + (b + W m).
                    scale = (norm.running_var.to(weight) + norm.eps).sqrt()
                    bias = bias + weight @ norm.running_mean.to(weight)
                    weight = weight * scale
                affine.weight.copy_(weight.reshape(affine.weight.shape).to(affine.weight))
                affine.bias.copy_(bias.to(affine.bias))


@dataclass(frozen=True)
class HeadLoss:
    """The cross-entropy the head is trained with, the module's criterion's arguments:
    `label_smoothing` in [0, 1] and `class_weight`, (classes,) or None."""

    label_smoothing: float = 0.0
    class_weight: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(
            logits, labels, weight=self.class_weight, label_smoothing=self.label_smoothing
        )

    def penalised(
        self, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float
    ) -> torch.Tensor:
        """The probe's objective: this loss of the head `x W^T + b` plus `l2 / 2 * |W|^2`."""
        return self(torch.addmm(bias, x, weight.T), y) + 0.5 * l2 * weight.pow(2).sum()


def _solve(
    weight: torch.Tensor,
    bias: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    l2: float,
    loss: HeadLoss,
) -> int:
    """Minimise the objective in place from the current `weight`, `bias`; returns the
    iterations L-BFGS took."""
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=MAX_ITERATIONS,
        tolerance_grad=GRADIENT_TOLERANCE,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss.penalised(weight, bias, x, y, l2)
        value.backward()
        return value

    optimizer.step(closure)
    return int(optimizer.state[weight].get("n_iter", 0))


# The validation scores besides accuracy, named as in a path point (`val_<metric>`).
PER_CLASS_MEANS = ("val_balanced_acc", "val_macro_f1")


@torch.no_grad()
def _evaluate(
    weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, loss: HeadLoss
) -> dict[str, float]:
    """`val_acc`, `val_balanced_acc`, `val_macro_f1` (the module's definitions: torchmetrics'
    micro and macro averages) and `val_loss` of the head on (N, D) `x` with labels `y`."""
    logits = torch.addmm(bias, x, weight.T)
    preds, classes = logits.argmax(dim=1), logits.shape[1]
    return {
        "val_acc": (preds == y).float().mean().item(),
        "val_balanced_acc": multiclass_accuracy(preds, y, classes, average="macro").item(),
        "val_macro_f1": multiclass_f1_score(preds, y, classes, average="macro").item(),
        "val_loss": loss(logits, y).item(),
    }


def solve(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    val_features: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    l2_grid: tuple[float, ...] = L2_GRID,
    label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None,
    selection: str = "val/acc",
) -> ProbeSolution:
    """Solve the linear probe on features.

    train_features: (N, D) float; train_labels: (N,) int64 in [0, num_classes); val_*: the same
    for the validation split, which chooses the L2 strength by `selection` (`val/acc`,
    `val/balanced_acc` or `val/macro_f1`; without validation images, or when they are empty,
    the grid's middle strength is used, solved once). `label_smoothing` and `class_weight`
    ((num_classes,) or None) are those of the loss gradient training uses
    (`torch.nn.functional.cross_entropy`'s), so that the solved head is the optimum of that
    loss, plus the L2 term; the validation loss is the same loss. Runs on the features'
    device, in float32. Raises ValueError when the training split is empty, the shapes
    disagree or `selection` is none of those.
    """
    started = time.perf_counter()
    selected = selection.replace("/", "_")  # the path point's key
    if selected not in ("val_acc", *PER_CLASS_MEANS):
        raise ValueError(
            f"selection must be val/acc, val/balanced_acc or val/macro_f1, not {selection!r}"
        )
    if len(train_features) == 0:
        raise ValueError("The linear probe needs at least one training image.")
    if train_features.ndim != 2 or len(train_features) != len(train_labels):
        raise ValueError(
            f"Features must be (N, D) with N labels; got {tuple(train_features.shape)} and "
            f"{tuple(train_labels.shape)}."
        )
    if class_weight is not None and tuple(class_weight.shape) != (num_classes,):
        raise ValueError(
            f"class_weight must be ({num_classes},), one per class; got {tuple(class_weight.shape)}."
        )
    weights = None if class_weight is None else class_weight.to(train_features).float()
    loss = HeadLoss(float(label_smoothing), weights)
    x = train_features.float()
    mean = x.mean(dim=0)
    # Constant features (std 0) stay at 0 after centring; dividing by 1 keeps them finite.
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    y = train_labels.long()
    validating = val_features is not None and val_labels is not None and len(val_features) > 0
    if validating:
        val_x = (val_features.float() - mean) / std
        val_y = val_labels.long()
    else:
        l2_grid = (l2_grid[len(l2_grid) // 2],)
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    best: tuple[tuple[float, float], dict[str, float], float, torch.Tensor, torch.Tensor] | None
    best = None
    path = []

    def try_strength(l2: float, stronger: bool) -> None:
        """Solve at `l2` from the current weights; keep it when it validates better (on a
        tie, when it is the `stronger` L2: a tie goes to the stronger)."""
        nonlocal best
        iterations = _solve(weight, bias, x, y, l2, loss)
        point = {"l2": l2, "iterations": iterations}
        score: tuple[float, float] = (0.0, 0.0)
        scores: dict[str, float] = {}
        if validating:
            scores = _evaluate(weight, bias, val_x, val_y, loss)
            point |= {name: round(value, 6) for name, value in scores.items()}
            score = (scores[selected], -scores["val_loss"])
        path.append(point)
        advance(1)
        if best is None or score > best[0] or (stronger and score == best[0]):
            best = (score, scores, l2, weight.detach().clone(), bias.detach().clone())

    solving = progress("Solving the linear probe", len(l2_grid), "L2 strengths")
    with torch.enable_grad(), solving as advance:
        for l2 in sorted(l2_grid, reverse=True):
            try_strength(l2, stronger=False)  # weaker than every one before it
        for _ in range(MAX_GRID_EXTENSIONS if validating and len(l2_grid) > 1 else 0):
            # The choice at an edge of the grid may be short of the best strength: the grid
            # grows past that edge, by its own step, until the choice is inside it.
            assert best is not None
            chosen = best[2]
            tried = [point["l2"] for point in path]
            step = max(l2_grid) / sorted(l2_grid)[-2]
            if chosen not in (max(tried), min(tried)):
                break
            with torch.no_grad():  # warm start from the edge's solution
                weight.copy_(best[3])
                bias.copy_(best[4])
            stronger = chosen == max(tried)
            try_strength(chosen * step if stronger else chosen / step, stronger)
    assert best is not None
    _, scores, l2, solved_weight, solved_bias = best
    # Fold the standardisation back: W (x - m) / s + b = (W / s) x + (b - (W / s) m).
    raw_weight = solved_weight / std
    raw_bias = solved_bias - raw_weight @ mean
    solution = ProbeSolution(raw_weight, raw_bias, l2, None, path, time.perf_counter() - started)
    solution.feature_mean, solution.feature_std = mean, std
    solution.selection = selection
    if validating:
        solution.val_acc, solution.val_loss = scores["val_acc"], scores["val_loss"]
        solution.val_scores = {name: scores[name] for name in PER_CLASS_MEANS}
    log.info(
        "Linear probe solved by L-BFGS: l2=%.3g chosen on %s (%s) from %d strengths in %.1f s",
        l2,
        selection,
        "no val images"
        if not validating
        else ", ".join(f"{k.replace('_', '/', 1)} {v:.4f}" for k, v in scores.items()),
        len(path),
        solution.seconds,
    )
    if not math.isfinite(float(raw_weight.abs().max())):
        raise ValueError("The linear probe diverged (non-finite weights); the features are bad.")
    tried = [point["l2"] for point in path]
    solution.at_edge = validating and len(tried) > 1 and l2 in (max(tried), min(tried))
    if solution.at_edge:
        log.warning(
            "The linear probe's l2=%.3g is still at the %s edge of the %d strengths searched "
            "(the grid grew %d steps past it): %s",
            l2,
            "strong" if l2 == max(tried) else "weak",
            len(tried),
            len(tried) - len(l2_grid),
            "the validation split prefers a head that is close to predicting the class prior, "
            "the usual sign of very few training images or features that do not separate the "
            "classes"
            if l2 == max(tried)
            else "the validation split prefers an almost unregularised head, whose large "
            "weights fine-tuning from it (lp_ft) may not survive",
        )
    return solution
