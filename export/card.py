"""The model card: ``README.md`` beside a package's manifest (written by ``export.build``).

Everything in it is read from the manifest (components, clusters, τ sweep, accuracies, the exact
config, the head candidates with their measured times), so the card cannot drift from the package
it describes. The τ-sweep table has the columns of paper 002's Table 2 (images
per number of heads run, accuracy gain, compute saving) plus top-1/top-5 and mean FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence

from modelpack.manifest import Manifest, SweepRow

CARD = "README.md"
CLUSTER_PLOT = "cluster_sizes.png"


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def short_name(name: str) -> str:
    """'goldfish, Carassius auratus' → 'goldfish' (WordNet synonyms after the first are noise here)."""
    return name.split(",")[0].strip()


HEAD_COLUMNS = 6  # the paper's Table 2 shows #1..#6; more heads are summed in one column


def sweep_table(rows: Sequence[SweepRow], num_heads: int, default_tau: float) -> list[str]:
    """Paper 002 Table 2 columns: τ, #1..#K (images that ran n heads), Acc. Gain, CC. Save."""
    shown = min(num_heads, HEAD_COLUMNS)
    head = ["τ", *[f"#{n}" for n in range(1, shown + 1)]]
    if num_heads > shown:
        head.append(f"#{shown + 1}–{num_heads}")
    head += ["top-1", "Acc. Gain", "top-5", "mean MFLOPs", "CC. Save", "mean heads",
             "true cluster run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        hist = list(r.heads_histogram) + [0] * num_heads
        cells = [f"**{r.tau:g}** (default)" if r.tau == default_tau else f"{r.tau:g}",
                 *[str(hist[n]) for n in range(shown)]]
        if num_heads > shown:
            cells.append(str(sum(hist[shown:num_heads])))
        cells += [pct(r.top1, 2), f"{100 * r.top1_gain:+.2f} pt", pct(r.top5, 2),
                  f"{r.mean_flops / 1e6:.1f}", pct(r.flop_saving), f"{r.mean_heads:.2f}",
                  pct(r.cluster_accuracy)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _settings(cfg: dict) -> list[str]:
    o, model, data = cfg["original"], cfg["model"], cfg["data"]
    ho, co, cl = cfg["head_optim"], cfg["clustifier_optim"], cfg["clustering"]
    def arch(h: dict) -> str:
        depth = f", first {h['blocks']} block(s) per stage" if h.get("blocks") else ""
        return f"`{h['name']}` (replace {list(h['replace']) or 'nothing'}, mid ×{h['mid_ratio']}{depth})"

    family = ", ".join(arch(h) for h in cfg["head_family"])
    prog = o.get("progressive") or []
    schedule = (f"{len(prog)} epochs progressive ({', '.join(f'{s}' for s in sorted(set(prog)))} px), "
                f"then {data['image_size']} px" if prog else f"{data['image_size']} px throughout")
    return [
        f"- Original model: ResNet, blocks per stage {model['layers']}, width {model['width']} "
        f"(stage channels ×1, ×2, ×4, ×8), stem stride {model['stem_stride']}, input "
        f"{data['image_size']}×{data['image_size']} RGB.",
        (f"- Original start: `{cfg['original_init']}`, widened to width {model['width']} without "
         "changing its function (Net2WiderNet, training/models/widen.py), then trained as below."
         if cfg.get("original_init") else ""),
        f"- Original training: {o['epochs']} epochs ({schedule}), SGD Nesterov momentum 0.9, "
        f"one-cycle lr {o['lr']}, batch {o['batch_size']}, weight decay {o['weight_decay']}, label "
        f"smoothing {o['label_smoothing']}, random crop (reflect pad) + horizontal flip; seed "
        f"{cfg['seed']}.",
        "- Weights stored as float16 in the ONNX files, computed in float32 (ONNX Runtime folds "
        "the casts when it loads them); every figure here is of the files as stored."
        if cfg.get("package", {}).get("weights") == "fp16" else "",
        f"- Split point: after `{cfg['split_after']}` (the trunk is the original's stages up to it, "
        "frozen).",
        f"- Class similarity: `{cl['similarity']}` on the calibration split; clustering "
        f"`{cl['method']}`" + (f" with the eigengap choosing between {cl['min_clusters']} and "
                              f"{cl['max_clusters']} clusters" if cl["method"] == "spectral" else "")
        + ".",
        f"- Clustifier: {arch(cfg['clustifier'])}, {co['epochs']} epochs on cached trunk features, "
        f"distilled from the original's cluster mass (α {co['distill']}, T {co['temperature']}).",
        f"- Head family: {family}; {ho['epochs']} epochs each on their cluster's images"
        + (f" plus {cfg.get('head_negatives', 0):g}× as many of other clusters (distillation only)"
           if cfg.get("head_negatives", 0) else "")
        + " (cached trunk features, one-cell shifts"
        + (" + mirrored copies" if cfg.get("feature_mirror", True) else "") + "), distilled from the "
        f"original (α {ho['distill']}, T {ho['temperature']}"
        + (f", logit matching β {ho['logit_match']:g}" if ho.get("logit_match", 0) else "")
        + "); per cluster the cheapest head (by measured "
        + ("time" if cfg.get("head_cost", "flops") == "time" else "FLOPs") + ") within "
        f"{100 * cfg['head_tolerance']:.1f} points of the best on the calibration split is kept.",
    ]


def render_card(m: Manifest) -> str:
    """The card's markdown for manifest ``m``."""
    t, cfg = m.training, m.training.config
    orig_flops = m.original.flops
    default = m.activator.default_tau
    row = next((r for r in m.tau_sweep if r.tau == default), None)
    per_class = {k: cfg.get(k) for k in ("val_per_class", "calib_per_class")}
    lines = [
        f"# {m.name} {m.version}: CP-CNN model card", "",
        f"A cluster-based partitioned CNN (CP-CNN) for the {t.num_classes} classes of "
        f"`{t.dataset}`: a shared trunk and a clustifier run on every image, then only the "
        "hyper-class heads the confusion-threshold activator picks. Served by "
        "`make serve` / `uvicorn service.app:app`; reproduced by "
        f"`python -m training run --config configs/{m.name}.toml` then "
        f"`python -m export package --config configs/{m.name}.toml`"
        + (f" (data from `{cfg['data']['path']}`)." if cfg["data"].get("path") else "."), "",
        "## Summary (validation split)", "",
        "| model | top-1 | top-5 | MFLOPs per image | FLOP saving |", "|---|---|---|---|---|",
        f"| original | {pct(t.original_accuracy.top1, 2)} | {pct(t.original_accuracy.top5, 2)} | "
        f"{orig_flops / 1e6:.1f} | — |",
    ]
    if row is not None:
        lines.append(f"| CP-CNN, τ = {default:g} (default) | {pct(row.top1, 2)} | {pct(row.top5, 2)} "
                     f"| {row.mean_flops / 1e6:.1f} | {pct(row.flop_saving)} |")
    lines += ["", f"Top-1 change at the default τ: {100 * row.top1_gain:+.2f} points."
              if row is not None else "", "",
              "## Default τ", "", m.activator.default_tau_reason or
              f"τ = {default:g} (set in the config).", "",
              *(["## Top-5 fill", "", m.activator.fill_reason, ""] if m.activator.fill_reason else []),
              "## Data and split", "",
              f"- `{t.dataset}`, {t.num_classes} classes, "
              + (f"from `{cfg['data']['path']}`." if cfg["data"].get("path") else
                 f"generated (`{cfg['data']['kind']}` dataset, no download)."),
              f"- Per class, a seeded (seed {t.split_seed}) split of the training images: "
              f"{per_class['val_per_class']} validation (never trained on, used only for the "
              f"figures here), {per_class['calib_per_class']} calibration (class similarity, "
              "clustifier confusion matrix, head choice), the rest training.",
              f"- Images: {t.train_images} train, {t.calib_images} calibration, {t.val_images} "
              "validation.", "",
              "## Training settings", "", *filter(None, _settings(cfg)), "",
              "## Components", "",
              "| part | file | MFLOPs | of original | parameters | architecture |",
              "|---|---|---|---|---|---|"]
    parts = [("original", m.original), ("trunk", m.trunk), ("clustifier", m.clustifier)] + [
        (f"head {c.index}", c.head) for c in m.clusters]
    for name, comp in parts:
        lines.append(f"| {name} | `{comp.file}` | {comp.flops / 1e6:.2f} | "
                     f"{pct(comp.flops / orig_flops)} | {comp.params:,} | {comp.architecture} |")
    lines += ["", "Measured time per run (ms at batch " + " / ".join(
        map(str, sorted(m.original.latency_ms))) + "): " + "; ".join(
        f"{name} {_ms(comp.latency_ms)}" for name, comp in parts[:3]) + "."
        if m.original.latency_ms else ""]
    lines += ["", f"Clustifier accuracy (the true class's cluster predicted): "
              f"{pct(t.clustifier_accuracy)} on the validation split.", "",
              "## Clusters (hyper-classes)", "",
              f"{m.num_clusters} clusters; sizes: {[len(c.classes) for c in m.clusters]}.", "",
              f"![cluster sizes]({CLUSTER_PLOT})", "",
              "| cluster | classes | head | head MFLOPs | members |", "|---|---|---|---|---|"]
    for c in m.clusters:
        names = ", ".join(short_name(m.class_names[i]) for i in c.classes)
        lines.append(f"| {c.index} | {len(c.classes)} | `{c.head.architecture}` | "
                     f"{c.head.flops / 1e6:.2f} | {names} |")
    lines += split_point_table(m) + head_selection_table(m)
    lines += ["", "## τ sweep", "",
              f"On the {t.val_images} validation images, through the serving runner and activator "
              f"(ranking `{m.activator.ranking}`, weighting `{m.activator.weighting}`, combination `{m.activator.combination}`). `#n`: "
              "images that ran exactly n heads (paper 002, Table 2); Acc. Gain: top-1 minus the "
              "original's; CC. Save: FLOP saving against the original; true cluster run: images "
              "whose class's head ran.", "", *sweep_table(m.tau_sweep, m.num_clusters, default), "",
              "![accuracy against FLOPs](tau_sweep.png)", "",
              *precision_table(m),
              "## Limitations", "",
              "- Figures are on a validation split carved from Tiny-ImageNet's training images "
              "(same distribution); expect lower accuracy on other photos.",
              "- FLOPs count convolutions and matmuls (2 × MACs), the same way for every part; "
              "latency saving on a given machine is measured by `make bench`.", ""]
    return "\n".join(lines)


def precision_table(m: Manifest) -> list[str]:
    """The sweep's accuracy on other backends/precisions beside fp32 (same routes and FLOPs)."""
    lines: list[str] = []
    fp32 = {r.tau: r for r in m.tau_sweep}
    o = m.training.original_accuracy
    for sweep in m.precision_sweeps:
        name = f"{sweep.backend} {sweep.precision}"
        lines += [f"Served on {name} (`CPCNN_BACKEND={sweep.backend}`, "
                  f"`CPCNN_PRECISION={sweep.precision}`): the same routes and FLOPs, computed in "
                  f"{sweep.precision}.", "",
                  f"| τ | top-1 fp32 | top-1 {sweep.precision} | top-5 fp32 | "
                  f"top-5 {sweep.precision} |", "|---|---|---|---|---|",
                  f"| original | {pct(o.top1, 2)} | {pct(sweep.original.top1, 2)} | {pct(o.top5, 2)} | "
                  f"{pct(sweep.original.top5, 2)} |"]
        for r in sweep.rows:
            f = fp32.get(r.tau)
            lines.append(f"| {r.tau:g} | {pct(f.top1, 2) if f else '—'} | {pct(r.top1, 2)} | "
                         f"{pct(f.top5, 2) if f else '—'} | {pct(r.top5, 2)} |")
        lines.append("")
    return lines


def _ms(latency: dict[int, float]) -> str:
    return " / ".join(f"{latency[b]:.2f}" for b in sorted(latency)) if latency else "—"


def split_point_table(m: Manifest) -> list[str]:
    """The trunk at every cut the export timed: what every image pays before any head."""
    if not m.split_points:
        return []
    o = m.original
    batches = sorted(o.latency_ms)
    lines = ["", "Where to cut: the trunk (paid by every image) cut after each stage, timed beside "
             "the original. Its share of the original's time bounds the saving at that cut.", "",
             "| trunk up to | MFLOPs | of original | ms (batch " + " / ".join(map(str, batches))
             + ") | of original's time | shipped |", "|---|---|---|---|---|---|"]
    for p in m.split_points:
        share = " / ".join(pct(p.trunk_latency_ms[b] / o.latency_ms[b]) for b in batches
                           if b in p.trunk_latency_ms)
        lines.append(f"| `{p.split_after}` | {p.trunk_flops / 1e6:.1f} | "
                     f"{pct(p.trunk_flops / o.flops)} | {_ms(p.trunk_latency_ms)} | {share} | "
                     f"{'**yes**' if p.chosen else ''} |")
    return lines


def head_selection_table(m: Manifest) -> list[str]:
    """Every head candidate per cluster: calibration accuracy, FLOPs, measured time, the pick."""
    sel = m.head_selection
    if sel is None or not sel.candidates:
        return []
    rule = ("measured time (the sum over batch sizes of its latency / the original's)"
            if sel.cost == "time" else "FLOPs")
    where = ""
    if sel.timing is not None:
        t = sel.timing
        where = (f" Times: {t.runtime}, {t.threads or 'all'} threads, batch "
                 f"{' / '.join(map(str, t.batch_sizes))}, median of {t.repetitions} interleaved "
                 f"rounds{', on ' + t.cpu if t.cpu else ''}.")
    lines = ["", f"Head candidates. Per cluster the cheapest by {rule} within "
             f"{100 * sel.tolerance:.1f} points of the best calibration top-1 is kept.{where}", "",
             "| cluster | head | calib top-1 | MFLOPs | ms (batch " +
             " / ".join(map(str, sel.timing.batch_sizes if sel.timing else [])) + ") | cost | chosen |",
             "|---|---|---|---|---|---|---|"]
    for c in sorted(sel.candidates, key=lambda c: (c.cluster, c.cost)):
        cost = f"{c.cost:.3f}" if sel.cost == "time" else f"{c.cost / 1e6:.2f} M"
        lines.append(f"| {c.cluster} | `{c.arch}` | {pct(c.accuracy)} | {c.flops / 1e6:.2f} | "
                     f"{_ms(c.latency_ms)} | {cost} | {'**yes**' if c.chosen else ''} |")
    return lines
