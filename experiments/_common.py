"""What the causal experiments (EXP1 intervention, EXP2 gain, EXP3 qk_control) share beyond the
generic run pipeline (`spectra_lens.runs.pipeline`): the default target / control heads
(`choose_heads`, rules below) and the k_eff definitions their manifests record.

Default heads. With no --target-layer the target layer is the middle one (n_layers // 2). With
no --target-head the target is the head of that layer with the most negative analytic local gain
dH/d ln α at α = 1 = −Var_p(s) (the head whose entropy responds most to query scale). The
control (no --control-head) is the head whose observational r(log ‖q‖, entropy) is nearest 0
with a tight document-level jackknife interval that covers 0 (`causal.CONTROL_RULE`), among all
heads but the target, or among the heads of --control-layer when given. Both are chosen on
`n_select` held-out sequences from documents disjoint from the measured ones
(`runs.pipeline.split_by_document`), so the heads are not chosen on the data that then measures
them. When the caller passes tokens, the selection
uses those tokens (recorded).
"""

from dataclasses import dataclass

import pandas as pd

from spectra_lens.causal import (
    CONTROL_RULE,
    CONTROL_TOP,
    choose_control_head,
    control_ranking,
    head_r_table,
)
from spectra_lens.errors import SpectraError
from spectra_lens.layout import AttentionLayout
from spectra_lens.metrics import K_EFF_DEFINITIONS
from spectra_lens.present.display import stages
from spectra_lens.runs.pipeline import RunTokens, check_layer_head
from spectra_lens.sweep import analytic_gain

__all__ = ["SELECTION_RULE", "HeadChoice", "choose_heads", "k_eff_definitions"]

SELECTION_RULE = (
    "target layer: given, else n_layers // 2; target head: given, else the head of the target "
    "layer with the most negative analytic gain -Var_p(s) at alpha = 1 (per-sequence means over "
    "the selection sequences); " + CONTROL_RULE
)


# --------------------------------------------------------------------------- default heads


@dataclass(frozen=True)
class HeadChoice:
    """The heads a run studies and how they were chosen."""

    target: tuple[int, int]  # (layer, head)
    control: tuple[int, int] | None  # (layer, head), or None when the experiment has no control
    chosen: tuple[str, ...]  # which of "target_layer", "target_head", ... came from the rule
    gains: dict  # {layer: [per-head mean analytic gain]} of the layers the rule looked at
    control_r: dict | None = None  # the control's row of the selection r table (CONTROL_RULE)

    def as_dict(self) -> dict:
        return {"target": list(self.target), "control": list(self.control) if self.control else None,
                "chosen_by_rule": list(self.chosen), "rule": SELECTION_RULE,
                "selection_gains": {str(l): g for l, g in self.gains.items()},
                **({"control_r": self.control_r} if self.control_r is not None else {})}


def choose_heads(cfg, model, layout: AttentionLayout, tokens: RunTokens, *,
                 control: bool = True, progress: bool = False) -> tuple[HeadChoice, pd.DataFrame | None]:
    """Target (and control) heads: the config's, with None fields chosen by SELECTION_RULE.

    Returns the choice and, with `control`, the control rule's top `causal.CONTROL_TOP`
    candidates on the selection documents (`causal.control_ranking`: r, its document jackknife
    interval and p, the rule's score, rank), the control marked (`role`, `chosen`; a given
    control is added when it is not among them).
    Raises SpectraError for a head out of range or a control equal to the target.
    `progress`: a bar over the two selection passes (each a forward pass over the selection
    sequences; ~20 s together on the default model on 2 shared cores).
    """
    t_layer = cfg.target_layer if cfg.target_layer is not None else layout.n_layers // 2
    t_head = cfg.target_head
    check_layer_head(layout, t_layer, t_head if t_head is not None else 0, "target")
    c_layer, c_head = getattr(cfg, "control_layer", None), getattr(cfg, "control_head", None)
    if control:
        check_layer_head(layout, t_layer if c_layer is None else c_layer,
                          c_head if c_head is not None else 0, "control")
    chosen = [name for name, v in (("target_layer", cfg.target_layer), ("target_head", t_head)) if v is None]
    gains: dict[int, list[float]] = {}
    n = len(tokens.select)
    names = ([f"target: analytic gain of layer {t_layer} on {n} sequences"] if t_head is None else []) \
        + ([f"control: r(log |q|, H) of every head on {n} sequences"] if control else [])
    with stages("choose heads", names, enabled=progress and bool(names)) as step:
        if t_head is None:
            step(names[0])
            g = analytic_gain(model, tokens.select, layers=[t_layer], min_position=cfg.min_position,
                              batch_size=cfg.max_rows).mean(0)
            gains = {t_layer: [round(float(x), 6) for x in g[0]]}
            t_head = min(range(layout.n_heads), key=lambda h: gains[t_layer][h])
        target = (t_layer, t_head)
        if not control:
            return HeadChoice(target, None, tuple(chosen), gains), None
        step(names[-1])
        table = head_r_table(model, tokens.select, tokens.select_documents,
                             min_position=cfg.min_position, ci=cfg.ci, batch_size=cfg.max_rows)
    if c_head is None:
        chosen += [name for name, v in (("control_layer", c_layer), ("control_head", c_head)) if v is None]
        ctrl = choose_control_head(table, target, layer=c_layer, ci=cfg.ci)
    else:
        ctrl = (t_layer if c_layer is None else c_layer, c_head)
    if ctrl == target:
        raise SpectraError(
            f"the control head must differ from the target head; both are layer {t_layer} head {t_head}"
        )
    ranked = control_ranking(table, target, layer=c_layer if c_head is None else None, ci=cfg.ci)
    is_ctrl = (ranked["layer"] == ctrl[0]) & (ranked["head"] == ctrl[1])
    shown = ranked[(ranked["rank"] <= CONTROL_TOP) | is_ctrl].copy()
    shown.insert(2, "role", ["control" if (l, h) == ctrl else "" for l, h in zip(shown["layer"], shown["head"])])
    shown.insert(3, "chosen", shown["role"] == "control")
    shown.insert(4, "chosen_by", "rule" if c_head is None else "")
    shown.loc[shown["chosen"], "chosen_by"] = "rule" if c_head is None else "given"
    first = ["rank", "layer", "head", "role", "chosen", "chosen_by", "r_log_q_entropy", "r_ci_low", "r_ci_high",
             "p_doc", "control_score", "eligible"]
    shown = shown[first + [c for c in shown.columns if c not in first]].reset_index(drop=True)
    row = table[(table["layer"] == ctrl[0]) & (table["head"] == ctrl[1])].iloc[0].to_dict()
    return HeadChoice(target, ctrl, tuple(chosen), gains, control_r=row), shown


# --------------------------------------------------------------------------- helpers


def k_eff_definitions() -> dict[str, str]:
    """What each k_eff column means (recorded in every manifest)."""
    return {"mean_k_eff": K_EFF_DEFINITIONS["k_eff_exp"], **K_EFF_DEFINITIONS}
