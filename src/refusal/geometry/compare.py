"""Several interventions on one model, side by side: the geometry table and a multi-panel plot.

    python -m refusal.geometry --interventions none,actadd,dim_ablation,inlp_nullspace,inlp_flip \
        --out geometry/qwen05 model=qwen05 data=embedded

The model is loaded and the directions fitted once; each intervention then costs two forward
passes over the test prompts (no generation), so this is the cheap way to answer "where do the
transformed activations land" for every intervention, plugins included. ``name:key=value`` sets
one intervention's parameters, e.g. ``actadd:coeff=1.0`` or ``inlp_flip:k=2:alpha=0.5``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.errors import HydraException
from omegaconf import DictConfig

from refusal.artifacts import atomic_write_text
from refusal.config import check_config, intervention_config, plugin_dirs
from refusal.context import prepare
from refusal.errors import ConfigError
from refusal.fits import fit_for, inlp_record
from refusal.geometry.collect import landing_at, landing_sites, probe_at
from refusal.geometry.plots import plot_capture, plot_landing
from refusal.geometry.stats import LANDING_THRESHOLDS, format_table
from refusal.interventions import get_intervention
from refusal.paths import CONF_DIR
from refusal.schema import config_dir as config_dir_of
from refusal.schema import type_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InterventionSpec:
    """One column of the comparison: an intervention name and its parameter overrides."""

    name: str
    params: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> InterventionSpec:
        name, *pairs = text.strip().split(":")
        params = []
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ConfigError(f"bad intervention spec {text!r}: write name:key=value, e.g. actadd:coeff=1.0")
            params.append((key, value))
        return cls(name, tuple(params))

    @property
    def label(self) -> str:
        return self.name + (" (" + ", ".join(f"{k}={v}" for k, v in self.params) + ")" if self.params else "")

    def overrides(self) -> list[str]:
        return [f"intervention={self.name}", *(f"intervention.{k}={v}" for k, v in self.params)]


def compose_configs(specs: list[InterventionSpec], overrides: list[str], config_dir: Path = CONF_DIR) -> dict[InterventionSpec, DictConfig]:
    """The full Hydra config of each spec (the same as evaluate.py would see with those overrides)."""
    if not (config_dir / "config.yaml").is_file():
        raise ConfigError(f"no conf/config.yaml in {config_dir}: run from a checkout of refusal or pass --config-dir")

    configs = {}
    with config_dir_of(config_dir):
        for spec in specs:
            try:
                configs[spec] = compose("config", overrides=[*overrides, *spec.overrides()])
            except HydraException as err:
                if (typed := type_error(err)) is not None:
                    raise ConfigError(f"{spec.label}: {typed}") from err
                known = sorted(p.stem for p in (config_dir / "intervention").glob("*.yaml"))
                raise ConfigError(f"{spec.label}: {str(err).splitlines()[0]} (interventions with a config: "
                                  f"{', '.join(known)}; check the Hydra overrides too)") from err
    return configs


def compare(configs: dict[InterventionSpec, DictConfig], out_dir: Path) -> dict[str, Any]:
    """Landing statistics of every spec at the DiM layer (and downstream), one table and one plot.

    Every spec is checked before any forward pass: its config before the model loads, its fitted
    parameters (k against the INLP rank, layers) right after fitting. Each row is written to
    geometry.json/.md as soon as it is done, so a failure later never loses what ran.
    """
    for cfg in configs.values():
        check_config(cfg)
    first = next(iter(configs.values()))
    ctx = prepare(first)
    interventions = {}
    for spec, cfg in configs.items():
        cls = get_intervention(spec.name, plugin_dirs(cfg))
        icfg = intervention_config(cfg)
        fitted = fit_for(ctx, cls, icfg, geometry=True)
        try:
            interventions[spec] = cls(icfg, fitted)
            interventions[spec].hook_specs(ctx.bundle)
        except ConfigError as err:
            raise ConfigError(f"{spec.label}: {err}") from None
    dim = fitted.dim
    layer, position = dim.layer, dim.position
    fitted = next((i.fitted for i in interventions.values() if i.fitted.inlp is not None), fitted)
    probes = {site: probe_at(ctx, site, position) for site in landing_sites(ctx, layer)}

    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "model": ctx.bundle.name, "data": ctx.splits.source, "layer": layer, "position": position,
        "n_harmful": len(ctx.splits.harmful_test), "n_harmless": len(ctx.splits.harmless_test),
        "thresholds": asdict(LANDING_THRESHOLDS), "rows": [], "plot": None,
    }
    if fitted.inlp is not None:
        result["inlp"] = inlp_record(fitted)
        result["capture_plot"] = str(plot_capture(result["inlp"], out_dir / "capture.png",
                                                  title=f"{ctx.bundle.name}, layer {layer}: INLP directions vs the DiM difference"))
    steered = {}
    for spec, intervention in interventions.items():
        per_site, acts = landing_at(ctx, intervention.fitted, intervention, probes)
        steered[spec.label] = acts["steered_harmful"][:, layer]
        here = per_site[layer]
        row = {"intervention": spec.label, "label": here["label"], "t": here["axis_coordinate"],
               "t_lo": here["axis_coordinate_ci95"][0], "t_hi": here["axis_coordinate_ci95"][1],
               "label_ci": here["label_ci"], "d_harmful": here["dist_to_harmful"],
               "d_harmless": here["dist_to_harmless"], "p_harmful": here["probe_p_harmful"],
               "p_lo": here["probe_p_harmful_ci95"][0], "p_hi": here["probe_p_harmful_ci95"][1],
               "harmless_t": here["harmless_axis_coordinate"]}
        expected = intervention.expected_landing(dim.direction)
        if expected:
            row.update(expected)
        row.update({f"t@L{s}": per_site[s]["axis_coordinate"] for s in probes if s != layer})
        result["rows"].append(row)
        _write(result, out_dir)  # after every row: what ran is never lost
        log.info("%s: %s (t = %.3f [%.3f, %.3f])", spec.label, here["label"], row["t"], row["t_lo"], row["t_hi"])

    result["plot"] = str(plot_landing(
        acts["base_harmful"][:, layer], acts["base_harmless"][:, layer], steered, out_dir / "geometry_landing.png",
        title=f"{ctx.bundle.name}, layer {layer}, position {position}: where each intervention moves harmful activations",
        probe=probes[layer],
    ))
    _write(result, out_dir)
    return result


def _write(result: dict[str, Any], out_dir: Path) -> None:
    atomic_write_text(out_dir / "geometry.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out_dir / "geometry.md", markdown(result))


def markdown(result: dict[str, Any]) -> str:
    th = result["thresholds"]
    return (
        f"# Where interventions land: {result['model']}, layer {result['layer']}, position {result['position']}\n\n"
        f"Data: {result['data']}; {result['n_harmful']} harmful and {result['n_harmless']} harmless test prompts.\n"
        f"`t` is the mean coordinate of transformed harmful activations on the DiM axis (0 = harmful mean, "
        f"1 = harmless mean), `d_*` their mean distance to each centroid in units of the centroid distance, "
        f"`p_harmful` a probe fitted on unsteered train activations, `harmless_t` the same coordinate for "
        f"transformed harmless activations (0 = harmless mean, 1 = harmful mean: induction), `t@L` downstream.\n"
        f"Labels: stays if t < {th['stays_below']}, opposite if t > {th['opposite_above']} and p_harmful < "
        f"{th['probe_harmful_below']}, between otherwise; `t_lo`–`t_hi` and `p_lo`–`p_hi` are 95% bootstrap "
        f"intervals over prompts and `label_ci` the label only where both whole intervals agree (else inconclusive). For INLP, `capture` is the "
        f"share |W_k Δ|²/|Δ|² of the DiM mean difference inside the k directions used, and `t_pred` the landing it "
        f"predicts for symmetric clusters (capture/2 for nullspace, (1+α)/2·capture for flip).\n\n"
        f"{format_table(result['rows'])}\n"
        + (f"\n![landing]({Path(result['plot']).name})\n" if result.get("plot") else "")
        + (f"\n![capture]({Path(result['capture_plot']).name})\n" if result.get("capture_plot") else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refusal.geometry", description=__doc__.splitlines()[0])
    parser.add_argument("--interventions", default="none,actadd,dim_ablation,inlp_nullspace,inlp_flip",
                        help="comma-separated names, each optionally name:key=value[:key=value]")
    parser.add_argument("--out", type=Path, default=Path("geometry"), help="folder for geometry.md/.json/.png")
    parser.add_argument("--config-dir", type=Path, default=CONF_DIR)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=qwen05 data=embedded")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    specs = [InterventionSpec.parse(t) for t in args.interventions.split(",") if t.strip()]
    if not specs:
        parser.error("--interventions is empty")
    result = compare(compose_configs(specs, args.overrides, args.config_dir), args.out)
    print(markdown(result))
    print(f"wrote {args.out / 'geometry.md'}, {args.out / 'geometry.json'}, {result['plot']}")
    return 0
