"""The Pareto section: the study's Optuna search beside the peers' searches (``bench/peers``) on the same prompts."""

from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

from refusal.compare import RunOutcomes
from refusal.errors import DataError
from refusal.report import flat_row, load_runs, pareto_front
from refusal.report.pareto import best_within, set_coverage
from refusal.report.tables import format_params
from refusal.stats.paired import PairedDifference, check_same_prompts, paired_rate_difference

from .plots import plot_fronts
from .runs import ModelRuns

PEERS = ("heretic", "abliterix")
#: A heretic-kernel trial's settings that the search fixes (experiment=pareto_weighted_ablation): not shown per trial.
FIXED = ("units", "projected", "embedding", "norm_preserving", "export")


def peer_rows(peers_dir: Path, model: str) -> dict[str, list[dict[str, Any]]]:
    """Each peer's trials on ``model`` as report rows (``bench/peers/run_peer.py``'s read-back), finished trials only."""
    out = {}
    for peer in PEERS:
        report = peers_dir / f"{model}-{peer}" / "report"
        rows = [flat_row(r, run) for run, r in load_runs(report) if r.get("status", "ok") == "ok"] if report.is_dir() else []
        if rows:
            out[peer] = rows
    return out


def peer_count(run_dir: Path, peer: str, model: str, finished: int) -> str:
    """How many trials of the peer's planned search finished (``run.json``), and how to continue one cut short."""
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8")) if (run_dir / "run.json").is_file() else {}
    planned = (run.get("sizes") or {}).get("trials")
    text = f"{model}, {peer}: {finished} finished trial{'s' * (finished != 1)}" + (f" of {planned} planned" if planned else "")
    stopped = run and run.get("returncode") != 0
    if stopped or (planned and finished < planned):  # a peer stopped by Ctrl+C may exit 0 with trials left
        text += (f", its search cut short ({run.get('returncode') if stopped else 'stopped early'}; `python "
                 f"bench/peers/run_peer.py {peer} --model {model} --resume` continues it)")
    return text + " (bench/peers)"


def unfinished_search(root: Path, model: str, finished: int, step: str = "pareto_weighted") -> str:
    """Empty when the study's search finished (its sweep wrote report.csv), else how far it got (``finished``
    trials): a search cut short keeps them, and rerunning the step replays them from their folders (resume) and goes on."""
    folder = root / model / step
    if (folder / "report.csv").exists() or not folder.exists():
        return ""
    stamp = root / model / f"{step}.command"
    planned = re.search(r"hydra\.sweeper\.n_trials=(\d+)", stamp.read_text()) if stamp.exists() else None
    return (f"unfinished: {finished}" + (f" of {planned.group(1)}" if planned else "") + " trials; `python bench/study.py "
            f"--models {model} --steps pareto` goes on from them")


def _points(rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    return [(r.get("harmful/refusal_rate"), r.get("harmless/kl_div")) for r in rows]


def _shown_params(row: dict[str, Any]) -> str:
    """The row's parameters as the table shows them (a heretic-kernel trial without its fixed choices)."""
    if row["intervention"] != "weighted_ablation":
        return row.get("params") or "-"
    params = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("params/") and k.split("/", 1)[1] not in FIXED}
    if params.get("direction") != "index":
        params.pop("direction_index", None)  # sampled always (as heretic does), used only with direction=index
    return format_params(params)


def _paired_difference(ours: Path, theirs: Path) -> PairedDifference | str:
    """Δ refusal (ours − theirs) on the harmful prompts both runs answered, paired, or why it cannot be."""
    try:
        a, b = RunOutcomes.from_dir(ours), RunOutcomes.from_dir(theirs)
        check_same_prompts(a.digests["harmful"], b.digests["harmful"], "our trial's and the peer's harmful prompts")
    except (DataError, KeyError) as err:
        return f"not paired: {err}"
    return paired_rate_difference(a.refused["harmful"], b.refused["harmful"])


def _paired(ours: Path, theirs: Path) -> str:
    d = _paired_difference(ours, theirs)
    if isinstance(d, str):
        return d
    return f"{100 * d.estimate:+.1f} [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}] pts, McNemar p {d.p_value:.2g} (n {d.n})"


#: Our heretic-kernel parameters by heretic 1.4.0's names, and whether heretic samples it in layers (ours: fractions
#: of the last layer index, as heretic draws them) rather than as the same unit-free number.
HERETIC_NAMES = {
    **{f"{ours}_{name}": (f"{theirs}.{name}", name in ("max_weight_position", "min_weight_distance"))
       for ours, theirs in (("attn", "attn.o_proj"), ("mlp", "mlp.down_proj"))
       for name in ("max_weight", "max_weight_position", "min_weight", "min_weight_distance")},
    "direction_index": ("direction_index", True),
}
SCOPES = {"per_layer": "per layer", "index": "global"}


def _as_heretic(row: dict[str, Any], last: int) -> dict[str, Any]:
    """A heretic-kernel trial of ours in heretic's names and units (what heretic would record for it)."""
    out = {"direction_scope": SCOPES.get(row.get("params/direction"))}
    for ours, (theirs, in_layers) in HERETIC_NAMES.items():
        if (value := row.get(f"params/{ours}")) is not None:
            out[theirs] = value * last if in_layers else value
    return out


def _same(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Every parameter heretic recorded equal in ours, numbers to 1e-6 relative: ours went through a fraction of the
    last layer and the study writes the distances' lower bound, 1/last, to 6 digits (1.000001 layers, not 1)."""
    for key, value in theirs.items():
        mine = ours.get(key)
        if isinstance(value, float) and isinstance(mine, float):
            if abs(mine - value) > 1e-6 * max(1.0, abs(value)):
                return False
        elif mine != value:
            return False
    return True


def same_parameters(model: str, ours: list[dict[str, Any]], theirs: list[dict[str, Any]], theirs_dir: Path,
                    n_layers: int, turn: dict[str, Any] | None = None, unfiltered: bool = False) -> list[str]:
    """heretic's trials beside ours at the same kernel parameters. Both searches draw the same random start-up
    trials (Optuna's TPE, the same seed, space and order), so there the search is identical and what differs is the
    rest of the method: the direction (ours Arditi-selected on filtered prompts, heretic's from its own means),
    its exact row-normalised edit against heretic's rank-3 LoRA, and the numerics. ``turn``: how far the refusal
    filter turns our per-layer directions (``bench/filter_direction_cosine.py``'s record for this model), none for
    ``unfiltered`` ones: the study's ``unfiltered`` step, fitted on every fit prompt as heretic's are."""
    pairs = []
    for theirs_row in theirs:
        wanted = {k.split("/", 1)[1]: v for k, v in theirs_row.items() if k.startswith("params/")}
        if wanted.get("direction_scope") == "per layer":
            wanted.pop("direction_index", None)  # drawn always, used only by the global scope
        match = next((r for r in ours if _same(_as_heretic(r, n_layers - 1), wanted)), None)
        if match is not None:
            pairs.append((theirs_row, match, _paired_difference(match["dir"] / match["run"], theirs_dir / theirs_row["run"])))
    if not pairs:
        return []
    rows = [f"| {t['run']} | {o['run']} | {t['harmful/refusal_rate']:.1%} | {o['harmful/refusal_rate']:.1%} | "
            + (d if isinstance(d, str) else f"{100 * d.estimate:+.1f} [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}], p {d.p_value:.2g}")
            + f" | {t['harmless/kl_div']:.3f} | {o['harmless/kl_div']:.3f} |" for t, o, d in pairs]
    diffs = [d for _, _, d in pairs if not isinstance(d, str)]
    lower = sum(d.hi < 0 for d in diffs)
    higher = sum(d.lo > 0 for d in diffs)
    less_kl = sum(o["harmless/kl_div"] < t["harmless/kl_div"] for t, o, _ in pairs)
    mean = sum(d.estimate for d in diffs) / len(diffs) if diffs else float("nan")
    ours_are = ("ours with the refusal filter off (`--steps unfiltered`: every fit prompt, as heretic's direction)"
                if unfiltered else "ours")
    direction = "our direction, from the same prompts as heretic's" if unfiltered else "our Arditi-selected direction"
    return [f"**{model}, heretic's trials and {ours_are} at the same kernel parameters** ({len(pairs)} of {len(theirs)} "
            "heretic trials drew parameters one of ours drew too: the same seeded random start-up trials, so the search "
            f"is the same and the rest of the method differs: {direction}, our exact row-normalised "
            "edit (heretic's: a rank-3 LoRA of it) and our numerics). Ours refuses less, paired interval below zero, "
            f"in {lower} of {len(diffs)} (more in {higher}), mean Δ {100 * mean:+.1f} pts; its KL is lower in {less_kl} "
            f"of {len(pairs)}{_filter_turn(turn)}:", "",
            "| heretic trial | our trial | heretic refusal | our refusal | Δ refusal (ours − heretic), paired, pts | "
            "heretic KL | our KL |", "|---|---|---|---|---|---|---|", *rows, ""]


def _filter_turn(turn: dict[str, Any] | None) -> str:
    """The clause on how far Arditi's refusal filter turns the per-layer directions away from every fit prompt's."""
    if not turn:
        return ""
    cosines, kept = turn["cosine_by_layer"], turn["kept_harmful_train"]
    return (f". The refusal filter keeps {kept['kept']}/{kept['of']} harmful fit prompts; per layer, the cosine between "
            f"the direction fitted on those and on all of them (heretic's plain mean difference) is {min(cosines):.3f}–"
            f"{max(cosines):.3f}, median {statistics.median(cosines):.3f} (`bench/filter_direction_cosine.py`)")


def dominance(model: str, label: str, ours: list[dict[str, Any]], peer: str, theirs: list[dict[str, Any]],
              theirs_dir: Path) -> list[str]:
    """Does the front of ``ours`` (rows with their folder, ``dir``) dominate the peer's? Set coverage both ways on
    (refusal, KL), then for each of the peer's front points our lowest refusal at no more KL, paired over the same
    harmful prompts (a point estimate one prompt lower is not a win)."""
    mine, their = _points(ours), _points(theirs)
    our_front, their_front = pareto_front(mine), sorted(pareto_front(their), key=lambda i: their[i][1])
    if not our_front or not their_front:
        return []
    rows, misses = [], []
    for i in their_front:
        j = best_within(mine, their[i][1])
        if j is None or mine[j][0] > their[i][0]:
            misses.append(f"{their[i][1]:.3g}")
        cells = ["-", "-", "-", "no trial of ours at this KL or less"] if j is None else [
            ours[j]["run"], f"{mine[j][0]:.1%}", f"{mine[j][1]:.3f}", _paired(ours[j]["dir"] / ours[j]["run"], theirs_dir / theirs[i]["run"])]
        rows.append(f"| {theirs[i]['run']} | {their[i][0]:.1%} | {their[i][1]:.3f} | " + " | ".join(cells) + " |")
    c_ours = set_coverage([mine[i] for i in our_front], [their[i] for i in their_front])
    c_theirs = set_coverage([their[i] for i in their_front], [mine[i] for i in our_front])
    verdict = (f"**{label} does not dominate {peer}'s front**: {peer} refuses less at KL " + ", ".join(misses) if misses else
               f"**{label} dominates {peer}'s front**: wherever {peer} has a front point, a trial of {label} refuses as "
               "little or less at no more KL")
    return [f"**{model}, {label} against {peer}.** Set coverage (Zitzler & Thiele 1999: the share of one front that a point "
            f"of the other weakly dominates): C({label}, {peer}) = {c_ours:.2f}, C({peer}, {label}) = {c_theirs:.2f}; {verdict}. "
            f"Each {peer} front point against our lowest refusal at no more KL, paired over the same harmful prompts:", "",
            f"| {peer} trial | {peer} refusal | KL | our trial | our refusal | our KL | Δ refusal (ours − {peer}), paired |",
            "|---|---|---|---|---|---|---|", *rows, ""]


def by_peer_count(model: str, ours: list[dict[str, Any]], peer: str, theirs: list[dict[str, Any]], run_dir: Path) -> list[str]:
    """Both fronts again, each trial's refusal counted the peer's own way (``bench/peers/peer_count.py``'s
    ``peer_count.json``; its recount of the peer's trials equals the peer's): does the verdict depend on the judge?"""
    path = run_dir / "peer_count.json"
    if not path.is_file():
        return []
    counts = json.loads(path.read_text(encoding="utf-8"))
    sides = []
    for rows, side in ((ours, counts["ours"]), (theirs, counts["peer"])):
        kept = [r for r in rows if r["run"] in side]
        sides.append((kept, [(side[r["run"]]["refusals"] / side[r["run"]]["n"], r["harmless/kl_div"]) for r in kept]))
    (ours, mine), (theirs, their) = sides
    our_front, their_front = pareto_front(mine), pareto_front(their)
    if not our_front or not their_front:
        return []
    misses = [f"{their[i][1]:.3g}" for i in sorted(their_front, key=lambda i: their[i][1])
              if (j := best_within(mine, their[i][1])) is None or mine[j][0] > their[i][0]]
    table = [f"| {label} | {rows[i]['run']} | {points[i][0]:.1%} | {rows[i]['harmful/refusal_rate']:.1%} | {points[i][1]:.3f} |"
             for label, rows, points, front in (("ours", ours, mine, our_front), (peer, theirs, their, their_front))
             for i in sorted(front, key=lambda i: points[i][1])]
    base = counts["peer"].get("unsteered")
    unsteered = f", unsteered {base['refusals']}/{base['n']}" if base else ""
    verdict = (f"by its count ours does not dominate {peer}'s front ({peer} refuses less at KL {', '.join(misses)})" if misses
               else f"by its count too, ours dominates {peer}'s front")
    return [f"**{model}, both searches by {peer}'s own count** (`bench/peers/peer_count.py` runs {peer}'s rule, with its "
            f"run's settings, on every trial's completions; it recounts each of {peer}'s trials to what {peer} counted"
            f"{unsteered}): "
            f"C(ours, {peer}) = {set_coverage([mine[i] for i in our_front], [their[i] for i in their_front]):.2f}, "
            f"C({peer}, ours) = {set_coverage([their[i] for i in their_front], [mine[i] for i in our_front]):.2f}; "
            f"{verdict}. The fronts by that count:", "",
            f"| search | trial | refusal ({peer}'s count) | refusal (substring) | KL |", "|---|---|---|---|---|", *table, ""]


def pareto_section(runs: dict[str, ModelRuns], figures: Path, root: Path, peers_dir: Path) -> list[str]:
    """The Optuna searches: which runs no other run beats on both harmful refusal and next-token KL; the peers'
    searches on the same prompts, budget and judge beside them, and whether our best front dominates theirs."""
    lines, counts, plots, dominance_lines = [], [], [], []
    for model, mr in runs.items():
        ours = mr.pareto + mr.pareto_weighted  # our best front: both searches and the reference runs
        cut = unfinished_search(root, model, len(mr.pareto_weighted))
        peers = peer_rows(peers_dir, model)
        if mr.pareto and peers:
            groups = {"ours: INLP flip search + references": mr.pareto}
            if mr.pareto_weighted:
                groups["ours: heretic's kernel, our search"] = mr.pareto_weighted
            plot = plot_fronts({**groups, **peers}, model, figures / f"{model}_fronts.png")
            plots.append(f"![{model} fronts](results/{plot.name})")
            counts += [peer_count(peers_dir / f"{model}-{peer}", peer, model, len(rows)) for peer, rows in peers.items()]
            if cut:
                dominance_lines += [f"**{model}: our heretic-kernel search is {cut}**, so the comparisons below that take "
                                    "it in are not yet at equal trial counts.", ""]
            for peer, rows in peers.items():  # the peer's front points, in the table's terms
                points = _points(rows)
                for i in sorted(pareto_front(points), key=lambda i: points[i]):
                    r = rows[i]
                    lines.append(f"| {model} | {peer} trial | {r.get('params') or '-'} | {r['harmful/refusal_rate']:.1%} | "
                                 f"{r['harmless/kl_div']:.3f} | **{peer} front** |")
                peer_dir = peers_dir / f"{model}-{peer}"
                dominance_lines += dominance(model, "ours", ours, peer, rows, peer_dir / "report")
                if peer == "heretic" and mr.pareto_weighted:  # the same method: does the search or the measure differ?
                    dominance_lines += dominance(model, "our search of heretic's kernel", mr.pareto_weighted, peer, rows,
                                                 peer_dir / "report")
                    turn = root / model / "filter_direction_cosine.json"
                    dominance_lines += same_parameters(model, mr.pareto_weighted, rows, peer_dir / "report",
                                                       int(mr.fitted["n_layers"]),
                                                       json.loads(turn.read_text()) if turn.exists() else None)
                    if mr.pareto_unfiltered:
                        dominance_lines += same_parameters(model, mr.pareto_unfiltered, rows, peer_dir / "report",
                                                           int(mr.fitted["n_layers"]), unfiltered=True)
                dominance_lines += by_peer_count(model, ours, peer, rows, peer_dir)
        if not ours:
            continue
        points = _points(ours)
        front = pareto_front(points)
        counts.append(f"{model}: {sum(r['intervention'] == 'inlp_flip' for r in ours)} INLP-flip trials, "
                      f"{len(mr.pareto_weighted)} heretic-kernel trials "
                      + (f"({cut}) " if cut else "") +
                      f"and {sum(r['intervention'] not in ('inlp_flip', 'weighted_ablation') for r in ours)} reference runs, "
                      f"DiM layer {mr.fitted.get('layer')}")
        for i in sorted(range(len(ours)), key=lambda i: points[i]):
            r = ours[i]
            lines.append(f"| {model} | {r['intervention']} | {_shown_params(r)} | {r['harmful/refusal_rate']:.1%} "
                         f"[{100 * r['harmful/refusal_rate_ci95'][0]:.0f}–{100 * r['harmful/refusal_rate_ci95'][1]:.0f}] | "
                         f"{r['harmless/kl_div']:.3f} | {'**front**' if i in front else ''} |")
        if (plot := root / model / "pareto" / "pareto.png").exists():
            shutil.copyfile(plot, figures / f"{model}_pareto.png")
            plots.append(f"![{model} pareto](results/{model}_pareto.png)")
    if not lines:
        return []
    pending = [model for model, mr in runs.items() if mr.pareto and not mr.pareto_weighted]
    return ["## Pareto search: the lowest refusal at the lowest damage", "",
            "Two Optuna searches (multi-objective TPE), each minimising harmful refusal and next-token KL on harmless "
            "prompts together: `experiment=pareto_inlp_flip` over INLP flip's k (a fraction of the converged rank) and "
            "α at the DiM layer, and `experiment=pareto_weighted_ablation`, heretic 1.4.0's method in our search: its "
            "per-component kernel and direction choice over its own ranges, with its projected direction, row norm "
            "preservation and untouched embedding (`weighted_ablation`; distances from 1 layer as heretic's"
            + (f"; not run yet on {', '.join(pending)}: the study's pareto step runs it" if pending else "") + "); DiM "
            "ablation, actadd (c = −1) and the baseline as lean reference runs. Each run is lean (`eval=trial`): the "
            "study's harmful test prompts with its token budget, substring judge, and KL at the last prompt position of "
            "its harmless test prompts. **front** = no other run of the model (either search, or a reference) is lower "
            "on both. " + "; ".join(counts) + ".", "",
            "| model | intervention | params | harmful refusal | next-token KL | |", "|---|---|---|---|---|---|", *lines, "",
            *(line for plot in plots for line in (plot, "")), *dominance_lines]
