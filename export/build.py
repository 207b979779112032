"""A model package from a trained run, and the one place a manifest is written.

``build_package``: graphs (``export.package``) → τ sweep (``export.sweep``) → card → manifest,
all in ``OUT.partial`` and renamed to ``OUT`` only once the package validates as the service
will load it, so a failed export never leaves a half package where a server looks.
``finish_package`` writes the card and the manifest; rewriting an existing package's card (new
status notes) goes through it too.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from export.card import CARD, CLUSTER_PLOT, render_card
from export.package import export_graphs
from export.sweep import sweep_package
from modelpack.manifest import Manifest, load_manifest, sha256_file, write_manifest
from training.artifacts import RunArtifacts

logger = logging.getLogger(__name__)


def build_package(art: RunArtifacts, out_dir: str | Path | None = None, *, sweep: bool = True,
                  notes: Path | None = None) -> Manifest:
    """Export ``art`` to a package at ``out_dir`` (default ``art.package_dir``), replacing it."""
    out_dir = Path(out_dir) if out_dir is not None else art.package_dir
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest = export_graphs(art, tmp)
    if sweep:
        pc = art.config.package
        manifest = sweep_package(tmp, manifest, *art.images("val"), pc.sweep_taus,
                                 max_top1_loss=pc.max_top1_loss if pc.choose_tau else None,
                                 calib=art.images("calib") if pc.choose_fill else None)
    manifest = finish_package(tmp, manifest, cluster_plot=art.cluster_plot, notes=notes)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    logger.info("package %s %s written to %s", manifest.name, manifest.version, out_dir)
    return manifest


def finish_package(package_dir: Path, manifest: Manifest, *, cluster_plot: Path | None = None,
                   notes: Path | None = None) -> Manifest:
    """Write the card (and the cluster-size plot) and then the manifest, listing both with their
    checksums; validate the result as the service will (schema, files, checksums).

    ``notes``: a markdown file appended to the card as "Status against the targets" (what was
    measured against what was asked, and what limited it), written by the people who trained it.
    """
    package_dir = Path(package_dir)
    extra = dict(manifest.extra_files)
    if cluster_plot is not None:
        shutil.copyfile(cluster_plot, package_dir / CLUSTER_PLOT)
        extra[CLUSTER_PLOT] = sha256_file(package_dir / CLUSTER_PLOT)
    text = render_card(manifest)
    if notes is not None:
        text += "\n## Status against the targets\n\n" + Path(notes).read_text()
    (package_dir / CARD).write_text(text)
    extra[CARD] = sha256_file(package_dir / CARD)
    manifest = manifest.model_copy(update={"extra_files": extra})
    write_manifest(manifest, package_dir)
    load_manifest(package_dir)
    return manifest


def rewrite_card(package_dir: Path, notes: Path | None = None) -> Path:
    """Re-render an existing package's card from its manifest (e.g. with new status notes)."""
    finish_package(package_dir, load_manifest(package_dir), notes=notes)
    return Path(package_dir) / CARD
