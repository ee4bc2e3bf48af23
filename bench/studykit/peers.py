"""The Pareto section: the study's Optuna search beside the peers' searches (``bench/peers``) on the same prompts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from refusal.report import flat_row, load_runs, pareto_front

from .plots import plot_fronts
from .runs import ModelRuns

PEERS = ("heretic", "abliterix")


def peer_rows(peers_dir: Path, model: str) -> dict[str, list[dict[str, Any]]]:
    """Each peer's trials on ``model`` as report rows (``bench/peers/run_peer.py``'s read-back), finished trials only."""
    out = {}
    for peer in PEERS:
        report = peers_dir / f"{model}-{peer}" / "report"
        rows = [flat_row(r, run) for run, r in load_runs(report) if r.get("status", "ok") == "ok"] if report.is_dir() else []
        if rows:
            out[peer] = rows
    return out


def pareto_section(runs: dict[str, ModelRuns], figures: Path, root: Path, peers_dir: Path) -> list[str]:
    """The Optuna search: which runs no other run beats on both harmful refusal and next-token KL; the peers'
    searches on the same prompts, budget and judge beside it."""
    lines, counts = [], []
    for model, mr in runs.items():
        peers = peer_rows(peers_dir, model)
        if mr.pareto and peers:
            plot = plot_fronts({"ours (INLP flip search + references)": mr.pareto, **peers}, model, figures / f"{model}_fronts.png")
            lines.append(f"\n![{model} fronts](results/{plot.name})\n")
            counts += [f"{model}, {peer}: {len(rows)} finished trials (bench/peers)" for peer, rows in peers.items()]
            for peer, rows in peers.items():  # the peer's front points, in the table's terms
                points = [(r.get("harmful/refusal_rate"), r.get("harmless/kl_div")) for r in rows]
                for i in sorted(pareto_front(points), key=lambda i: points[i]):
                    r = rows[i]
                    lines.append(f"| {model} | {peer} trial | {r.get('params') or '-'} | {r['harmful/refusal_rate']:.1%} | "
                                 f"{r['harmless/kl_div']:.3f} | **{peer} front** |")
        if not mr.pareto:
            continue
        points = [(r.get("harmful/refusal_rate"), r.get("harmless/kl_div")) for r in mr.pareto]
        front = pareto_front(points)
        counts.append(f"{model}: {sum(r['intervention'] == 'inlp_flip' for r in mr.pareto)} INLP-flip trials "
                      f"and {sum(r['intervention'] != 'inlp_flip' for r in mr.pareto)} reference runs, DiM layer {mr.fitted.get('layer')}")
        for i in sorted(range(len(mr.pareto)), key=lambda i: points[i]):
            r = mr.pareto[i]
            lines.append(f"| {model} | {r['intervention']} | {r.get('params') or '-'} | {r['harmful/refusal_rate']:.1%} "
                         f"[{100 * r['harmful/refusal_rate_ci95'][0]:.0f}–{100 * r['harmful/refusal_rate_ci95'][1]:.0f}] | "
                         f"{r['harmless/kl_div']:.3f} | {'**front**' if i in front else ''} |")
        if (plot := root / model / "pareto" / "pareto.png").exists():
            shutil.copyfile(plot, figures / f"{model}_pareto.png")
            lines.append(f"\n![{model} pareto](results/{model}_pareto.png)\n")
    if not lines:
        return []
    return ["## Pareto search: the lowest refusal at the lowest damage", "",
            "An Optuna search (`experiment=pareto_inlp_flip`, multi-objective TPE) over INLP flip's k (a fraction of the "
            "converged rank) and α at the DiM layer, minimising harmful refusal and next-token KL on harmless prompts "
            "together; DiM ablation, actadd (c = −1) and the baseline as lean reference runs in the same folder. Each "
            "run is lean (`eval=trial`): the study's harmful test prompts with its token budget, substring judge, and KL "
            "at the last prompt position of its harmless test prompts. **front** = no other run of the model is lower "
            "on both. " + "; ".join(counts) + ".", "",
            "| model | intervention | params | harmful refusal | next-token KL | |", "|---|---|---|---|---|---|", *lines, ""]


