"""What an experiment produced, gathered: the summary of every experiment and one experiment's report.

- :func:`model_results`: each model of an experiment with train's metrics.json, evaluate's
  metrics (results/EXPERIMENT/MODEL/evaluation/SPLIT/metrics.json), its settings snapshot
  and training time;
- :func:`write_experiments_table`: results/summary.csv and summary.md, one row per experiment and
  model: the settings that differ from the defaults, pixel IoU and F1, object F1, training time;
- :func:`write_report`: results/EXPERIMENT/report.html, one self-contained page (images
  embedded as base64): metrics of every model, settings, data, training curves, overlays.

evaluate writes all three after scoring a model; the runner (pipeline.py) prints :func:`metrics_table`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from core.files import atomic_path
from core.settings import Settings
from core.tree import SPLITS, DataTree
from evaluate.classes import share
from workflow.stages import MODELS

log = logging.getLogger(__name__)

#: PNGs larger than this are embedded as JPEG (the files themselves stay PNG).
JPEG_ABOVE = 300_000

#: Pictures a model's results folder may hold, with their captions, in page order.
TRAINING_PICTURES = (
    ("curves.png", "Training curves"),
    ("overlays.png", "Validation chips at training time: best and worst by IoU"),
    ("feature_importance.png", "Feature importance"),
    ("coefficients.png", "Coefficients"),
)
EVALUATION_PICTURES = (
    ("threshold_sweep.png", "Threshold sweep"),
    ("best.png", "Best chips"),
    ("worst.png", "Worst chips"),
    ("instances.png", "Roofs as objects: one colour per predicted roof, true roofs outlined white on black"),
    ("confusion.png", "Classes: the confusion matrix of pixels and of the roofs found"),
    ("classes.png", "Classes: the class of each roof pixel, true (top) and predicted (bottom)"),
)


def evaluation_dir(tree: DataTree, model: str, split: str) -> Path:
    """results/EXPERIMENT/MODEL/evaluation/SPLIT/: what evaluate writes for one model and split."""
    return tree.model_dir(model) / "evaluation" / split


@dataclass
class ModelResult:
    """One model of one experiment: what train and evaluate recorded."""

    experiment: str
    model: str
    folder: Path
    train: dict[str, Any] | None
    evaluations: dict[str, dict[str, Any]]
    settings: dict[str, Any] | None

    def evaluation(self, split: str | None = None) -> dict[str, Any] | None:
        """Evaluate's record of ``split``, else of val, else of any split."""
        for s in (split, "val", *SPLITS):
            if s in self.evaluations:
                return self.evaluations[s]
        return None

    @property
    def train_seconds(self) -> float | None:
        """Training time from train's metrics.json (train_seconds; fit_seconds in classical models' older files)."""
        if not self.train:
            return None
        value = self.train.get("train_seconds", self.train.get("fit_seconds"))
        return float(value) if value is not None else None

    def changes(self, evaluation: dict[str, Any] | None) -> dict[str, Any]:
        """The settings that differ from the defaults: the bundle's, its predict_args replaced by those the
        scored predictions were made with (predict_args.tta, a threshold...) where evaluate recorded them."""
        changed = settings_changes(self.settings or {})
        if evaluation is None or "predict_settings" not in evaluation:
            return changed
        kept = {k: v for k, v in changed.items() if not k.startswith("predict_args.")}
        return kept | evaluation["predict_settings"]

    def row(self, split: str | None = None) -> dict[str, Any]:
        """The summary row: evaluate's scores when there are some, else train's validation scores."""
        ev = self.evaluation(split)
        source = ev or self.train or {}
        pixel = source.get("pixel", {})
        return {
            "experiment": self.experiment,
            "model": self.model,
            "split": source.get("split", ""),
            "scored_by": "evaluate" if ev else "train" if self.train else "",
            "pixel_iou": pixel.get("iou"),
            "pixel_f1": pixel.get("f1"),
            "precision": pixel.get("precision"),
            "recall": pixel.get("recall"),
            "object_f1": ev["object"]["f1"] if ev and "object" in ev else None,
            "polygon_f1": ev["polygon"]["f1"] if ev and "polygon" in ev else None,
            "threshold": source.get("threshold"),
            "train_seconds": self.train_seconds,
            "settings": "; ".join(f"{k}={_compact(v)}" for k, v in self.changes(ev).items()),
        }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if path.exists():
            log.warning("%s is unreadable (%s): left out of the summary", path, exc)
        return None


def _compact(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _model_key(model: str) -> tuple[int, str]:
    return (MODELS.index(model) if model in MODELS else len(MODELS), model)  # tables list them in pipeline order


def model_results(experiment_dir: Path) -> list[ModelResult]:
    """Every model folder of results/EXPERIMENT/ that holds train's or evaluate's metrics, in pipeline order."""
    results = []
    if not experiment_dir.is_dir():
        return results
    for folder in sorted((p for p in experiment_dir.iterdir() if p.is_dir()), key=lambda p: _model_key(p.name)):
        train = _read_json(folder / "metrics.json")
        evaluations = {}
        for split in SPLITS:
            record = _read_json(folder / "evaluation" / split / "metrics.json")
            if record is not None:
                evaluations[split] = record
        if train is None and not evaluations:
            continue
        bundle = _read_json(folder / "bundle" / "bundle.json") or {}
        settings = bundle.get("settings") or _read_json(folder / "settings.json")
        results.append(ModelResult(experiment_dir.name, folder.name, folder, train, evaluations, settings))
    return results


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def default_settings() -> dict[str, Any]:
    """Every setting's default as JSON (the experiment name left out)."""
    return Settings(experiment="x").model_dump(mode="json")


def settings_changes(snapshot: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys whose value in a settings snapshot differs from the default (experiment left out)."""
    defaults = _flat(default_settings())
    changed = {}
    for key, value in _flat(snapshot).items():
        if key == "experiment":
            continue
        if key not in defaults or json.dumps(defaults[key]) != json.dumps(value):
            changed[key] = value
    return changed


# --- results/summary.csv and summary.md ----------------------------------------------------------

SUMMARY_COLUMNS = {
    "experiment": "experiment",
    "model": "model",
    "split": "split",
    "pixel_iou": "pixel IoU",
    "pixel_f1": "pixel F1",
    "object_f1": "object F1",
    "polygon_f1": "polygon F1",
    "train_seconds": "training s",
    "settings": "settings that differ from the defaults",
}


def summary_frame(results_root: Path) -> pd.DataFrame:
    """One row per experiment and model under results/, experiments in name order."""
    rows = []
    if results_root.is_dir():
        for experiment in sorted(p for p in results_root.iterdir() if p.is_dir()):
            rows += [r.row() for r in model_results(experiment)]
    columns = list(ModelResult("", "", Path(), None, {}, None).row())
    return pd.DataFrame(rows, columns=columns)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_experiments_table(results_root: Path) -> tuple[Path, Path]:
    """Write results/summary.csv (every column) and summary.md (the main ones); return both paths."""
    frame = summary_frame(results_root)
    csv_path, md_path = results_root / "summary.csv", results_root / "summary.md"
    with atomic_path(csv_path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    lines = [
        "# Experiments",
        "",
        "Written by evaluate from results/EXPERIMENT/MODEL/ (scores: evaluate's when there are some, "
        "else train's validation scores).",
        "",
        "| " + " | ".join(SUMMARY_COLUMNS.values()) + " |",
        "|"
        + "|".join("---" if k in ("experiment", "model", "split", "settings") else "---:" for k in SUMMARY_COLUMNS)
        + "|",
    ]
    for _, row in frame.iterrows():
        cells = [_fmt(row[k], 1 if k == "train_seconds" else 3).replace("|", "\\|") or "—" for k in SUMMARY_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


# --- the console table ---------------------------------------------------------------------------


def metrics_table(tree: DataTree, split: str = "val") -> list[str]:
    """Lines of a table of every model's scores in this experiment (empty when there is none)."""
    results = model_results(tree.results)
    if not results:
        return []
    header = (
        f"{'model':<12}{'split':<6}{'pixel IoU':>10}{'F1':>7}{'precision':>11}{'recall':>8}{'object F1':>11}"
        f"{'polygon F1':>12}{'threshold':>11}{'train s':>9}"
    )
    lines = [header]
    for r in results:
        row = r.row(split)
        lines.append(
            f"{r.model:<12}{row['split']:<6}{_fmt(row['pixel_iou']):>10}{_fmt(row['pixel_f1']):>7}"
            f"{_fmt(row['precision']):>11}{_fmt(row['recall']):>8}{_fmt(row['object_f1']) or '—':>11}"
            f"{_fmt(row['polygon_f1']) or '—':>12}{_fmt(row['threshold']):>11}{_fmt(row['train_seconds'], 0):>9}"
        )
    return lines


# --- results/EXPERIMENT/report.html --------------------------------------------------------------

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2733; margin: 0; background: #f4f6f8; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; border-bottom: 2px solid #dde3ea; padding-bottom: 4px;
margin-top: 36px; } h3 { font-size: 16px; margin: 22px 0 8px; }
.meta { color: #5b6775; margin: 0 0 18px; } .note { color: #5b6775; font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 14px; }
th, td { padding: 5px 10px; border-bottom: 1px solid #e3e8ee; text-align: right; vertical-align: top; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
th { background: #eef2f6; font-weight: 600; } td.best { font-weight: 700; color: #0b6b3a; }
figure { margin: 10px 0 20px; } figure img { max-width: 100%; border: 1px solid #e3e8ee; }
figure.narrow { max-width: 720px; }
figcaption { color: #5b6775; font-size: 13px; margin-top: 3px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 10px; }
details { margin: 8px 0; } pre { background: #f4f6f8; padding: 10px; overflow: auto; font-size: 12px; }
nav a { margin-right: 14px; }
"""


def _embedded(path: Path) -> tuple[str, bytes]:
    """A picture's MIME type and bytes for the page: big PNGs (photographic overlays) as JPEG, a quarter the size."""
    data = path.read_bytes()
    if len(data) <= JPEG_ABOVE:
        return "image/png", data
    from PIL import Image  # matplotlib's own dependency

    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=88)
    jpeg = buffer.getvalue()
    return ("image/jpeg", jpeg) if len(jpeg) < len(data) else ("image/png", data)


def _img(path: Path, caption: str, css: str = "") -> str:
    mime, data = _embedded(path)
    encoded = base64.b64encode(data).decode("ascii")
    style = f' class="{css}"' if css else ""
    return (
        f'<figure{style}><img alt="{html.escape(caption)}" src="data:{mime};base64,{encoded}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    head = "".join(
        f'<th class="{"text" if i < text_columns else ""}">{html.escape(h)}</th>' for i, h in enumerate(header)
    )
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"text" if i < text_columns else ""}">{c}</td>' for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _outdated_note(
    results: list[ModelResult], settings: Settings, tree: DataTree, overrides: Sequence[str] = ()
) -> str:
    """A warning naming the models whose evaluation the current settings and data no longer give (made before
    an edit, e.g. of the class map): their figures on this page are of the earlier run. The current settings
    are the command's, its --set ``overrides`` included: the note names them, since a one-off override judges
    every model by it."""
    from workflow.contract import why_outdated

    stale = []
    for r in results:
        if settings.evaluate_args.split not in r.evaluations:
            continue  # (trained, not evaluated: no figures of its own on the page)
        try:
            why = why_outdated("evaluate", settings, tree, r.model)  # its own record, or an earlier stage's
        except Exception:  # a report is written whatever the records say
            continue
        if why:
            stale.append(f"<li><b>{html.escape(r.model)}</b>: {html.escape(why)}</li>")
    if not stale:
        return ""
    given = ""
    if overrides:
        given = (
            f" (these settings are the file's with this command's --set {html.escape(', '.join(overrides))}: "
            "an override given to one command only judges every model by it, and evaluate without it judges them "
            "by the file)"
        )
    return (
        '<div class="note"><p>These models\' figures are of an earlier run: the current settings or data would '
        f"give others{given}. Rerun what each line names (python pipeline.py reruns every outdated stage) before "
        "comparing.</p><ul>" + "".join(stale) + "</ul></div>"
    )


def _metrics_section(results: list[ModelResult], split: str) -> str:
    if not results:
        return "<p>No model trained yet: run python train/train.py, then predict and evaluate.</p>"
    rows, f1s = [], []
    for r in results:
        row = r.row(split)
        ev = r.evaluation(split)
        obj = ev.get("object", {}) if ev else {}
        acc = (ev or r.train or {}).get("pixel", {}).get("accuracy")
        f1s.append(row["pixel_f1"] or 0.0)
        rows.append(
            [
                html.escape(r.model),
                html.escape(f"{row['split']} ({row['scored_by']})"),
                _fmt(row["pixel_iou"]),
                _fmt(row["pixel_f1"]),
                _fmt(row["precision"]),
                _fmt(row["recall"]),
                _fmt(acc),
                _fmt(obj.get("precision")) or "—",
                _fmt(obj.get("recall")) or "—",
                _fmt(row["object_f1"]) or "—",
                _fmt(row["polygon_f1"]) or "—",
                _fmt(row["threshold"]),
                _fmt(row["train_seconds"], 0),
            ]
        )
    best = max(range(len(rows)), key=lambda i: f1s[i])
    rows[best][3] = f"<b>{rows[best][3]}</b>"
    header = ["model", "scored on", "pixel IoU", "pixel F1", "precision", "recall", "accuracy", "object precision",
              "object recall", "object F1", "polygon F1", "threshold", "training s"]  # fmt: skip
    note = (
        '<p class="note">Pixel scores come from confusion counts over the whole split. Objects are 4-connected roof '
        "pieces; a predicted roof matches a true one at IoU &ge; the evaluation's iou_threshold (SpaceNet rules); "
        "roofs under min_area pixels are ignored. (train): the validation scores train recorded, before evaluate ran.</p>"
    )
    return _table(header, rows, 2) + note


def _settings_section(settings: Settings) -> str:
    changed = settings_changes(settings.model_dump(mode="json"))
    defaults = _flat(default_settings())
    if changed:
        rows = [
            [html.escape(k), html.escape(_compact(v)), html.escape(_compact(defaults.get(k, "")))]
            for k, v in changed.items()
        ]
        table = _table(["setting", "value", "default"], rows, 3)
    else:
        table = "<p>Every setting is at its default.</p>"
    full = html.escape(json.dumps(settings.model_dump(mode="json"), indent=2))
    return f"{table}<details><summary>All settings</summary><pre>{full}</pre></details>"


def _data_section(tree: DataTree) -> str:
    parts = []
    if tree.chips_csv.is_file():
        index = pd.read_csv(tree.chips_csv, dtype={"split": str}, keep_default_na=False)
        rows = []
        groups = [("all chips", index)]
        if "split" in index.columns:
            groups += [(s, index[index["split"] == s]) for s in SPLITS if (index["split"] == s).any()]
            if (index["split"] == "").any():
                groups.append(("left out", index[index["split"] == ""]))
        for name, part in groups:
            roof = part["roof_share"] if "roof_share" in part.columns else None
            rows.append(
                [
                    html.escape(name),
                    str(len(part)),
                    str(int((roof > 0).sum())) if roof is not None else "",
                    f"{100 * roof.mean():.2f}%" if roof is not None and len(part) else "",
                    f"{100 * part['nodata_share'].mean():.1f}%" if len(part) else "",
                ]
            )
        size = f"{int(index['width'].iloc[0])}x{int(index['height'].iloc[0])}"
        parts.append(f"<p>{len(index)} chips of {size} pixels, from {html.escape(str(tree.root))}.</p>")
        parts.append(_table(["chips", "count", "with roofs", "roof share", "nodata share"], rows))
    else:
        parts.append("<p>No chip index yet (data/chips.csv).</p>")
    stats = tree.summary / "stats.json"
    if stats.is_file():
        record = json.loads(stats.read_text(encoding="utf-8"))
        parts.append(_bands_table(record))
    pictures = []
    if tree.quicklook.is_file():
        pictures.append(_img(tree.quicklook, "The scene with its labels (data/quicklook.png)", "narrow"))
    for name, caption in (
        ("roof_vs_background.png", "Roof and background values per band"),
        ("classes_per_band.png", "Each class's values per band"),
        ("class_separation.png", "How far apart the classes lie in each band"),
    ):
        if (tree.summary / name).is_file():
            pictures.append(_img(tree.summary / name, caption))
    parts += pictures
    hists = sorted(tree.summary.glob("histogram_band_*.png"), key=lambda p: int(p.stem.rpartition("_")[2]))
    if hists:
        parts.append("<h3>Histograms</h3><div class=grid>")
        parts += [_img(p, p.stem.replace("_", " ")) for p in hists]
        parts.append("</div>")
    return "".join(parts)


def _bands_table(record: dict[str, Any]) -> str:
    """summarize's band statistics: roof and background means and their separation, or with classes each
    class's mean and the best-separated pair of classes of each band (Cohen's d)."""
    bands = record.get("bands", [])
    if not bands:
        return ""
    title = "<h3>Bands (data/summary/stats.json)</h3>"
    if record.get("classes"):
        names = list(bands[0].get("classes", {}))
        best: dict[int, dict[str, Any]] = {}
        for pair in record.get("separation", []):
            if pair.get("cohen_d") is None:  # (no spread in either class: nothing to compare)
                continue
            if pair["band"] not in best or abs(pair["cohen_d"]) > abs(best[pair["band"]]["cohen_d"]):
                best[pair["band"]] = pair
        rows = []
        for band in bands:
            pair = best.get(band["band"])
            apart = f"{' / '.join(pair['classes'])}: d {pair['cohen_d']:.2f}" if pair else ""
            rows.append([str(band["band"]), *(_fmt(band["classes"].get(n, {}).get("mean"), 1) for n in names),
                         html.escape(apart)])  # fmt: skip
        header = ["band", *(f"{n} mean" for n in names), "best separated (Cohen's d)"]
        return title + _table(header, rows)
    rows = []
    for band in bands:
        roof, bg = band.get("roof", {}), band.get("background", {})
        rows.append(
            [str(band["band"]), _fmt(roof.get("mean"), 1), _fmt(bg.get("mean"), 1), _fmt(band.get("separation"))]
        )
    return title + _table(["band", "roof mean", "background mean", "separation (0 same, 1 apart)"], rows)


def _classes_table(classes: dict[str, Any]) -> str:
    """Each class's pixel scores, and the share of found roofs given their class."""
    rows = [[html.escape(name), _fmt(v["iou"]), _fmt(v["f1"]), _fmt(v["precision"]), _fmt(v["recall"]),
             f"{v['pixels']:,}"] for name, v in classes["pixel"].items()]  # fmt: skip
    note = (
        f'<p class="note">Material right for {100 * classes["roof_accuracy"]:.1f}% of the {classes["roofs_found"]} '
        "true roofs found (matched one to one at the polygon scores' IoU).</p>"
    )
    return _table(["class", "pixel IoU", "pixel F1", "precision", "recall", "true pixels"], rows) + note


def _object_filter_note(stats: dict[str, Any] | None, evaluation: dict[str, Any] | None = None) -> str:
    """What train's metrics.json says of the model's object filter, as a paragraph ("" before filters existed);
    and, where predict kept every object of the scored predictions, why (``evaluation``'s predict_applied)."""
    if not stats:
        return ""
    applied = (evaluation or {}).get("predict_applied") or {}
    off = ""
    if applied and not applied.get("instances"):
        off = " It was not applied to the scored predictions: they were made without objects (predict_args.instances false)."
    elif "off" in (applied.get("object_filter") or {}):
        off = f" It was not applied to the scored predictions: {html.escape(applied['object_filter']['off'])}."
    if "cut" not in stats:
        return (f'<p class="note">No object filter: the validation chips held {stats["objects"]} objects, '
                f"{stats['roofs']} on roofs, too few of a kind; predict keeps every object.</p>")  # fmt: skip
    (p0, p1), (o0, o1) = stats["pixel_f1"], stats["object_f1"]
    own = []
    for name, c in (stats.get("by_class") or {}).items():  # a class bundle's filters of each class
        (q0, q1), (r0, r1) = c["pixel_f1"], c["object_f1"]
        own.append(
            f" The {html.escape(name)} objects have a filter of their own, fitted on {c['objects']} ({c['roofs']} on "
            f"{html.escape(name)} roofs): cut {c['cut']:g}; it drops {share(c['false_dropped'])} of the {html.escape(name)} "
            f"objects on no {html.escape(name)} roof and keeps {share(c['roofs_kept'])} of those on {html.escape(name)} "
            f"roofs; {html.escape(name)} pixel F1 {q0:.3f} &rarr; {q1:.3f}, object F1 "
            f"{r0:.3f} &rarr; {r1:.3f}."
        )
    return (
        f'<p class="note">Object filter, fitted on the {stats["objects"]} objects of the validation chips '
        f"({stats['roofs']} on roofs): cut {stats['cut']:g}; it drops {share(stats['false_dropped'])} of the false "
        f"objects and keeps {share(stats['roofs_kept'])} of the roofs; validation pixel F1 {p0:.3f} &rarr; {p1:.3f}, "
        f"object F1 (objects of 4 m&sup2; or more) {o0:.3f} &rarr; {o1:.3f}.{''.join(own)}{off}</p>"
    )


def _tta_note(train: dict[str, Any] | None) -> str:
    """The threshold train tuned for test-time augmentation (a U-Net's metrics.json), as a paragraph ("" without)."""
    if not train or train.get("threshold_tta") is None:
        return ""
    return (
        f'<p class="note">With test-time augmentation (predict_args.tta) predict uses the threshold '
        f"{train['threshold_tta']:.3f}, tuned on the averaged validation probabilities: validation pixel IoU "
        f"{train['tta_pixel']['iou']:.3f}, against {train['pixel']['iou']:.3f} without at {train['threshold']:.3f}.</p>"
    )


def _merge_note(train: dict[str, Any] | None, evaluation: dict[str, Any] | None = None) -> str:
    """The merge limit train tuned for the pieces of one roof (a U-Net's metrics.json), as a paragraph ("" without);
    with the limit the scored predictions were made with where that was another (``evaluation``'s predict
    settings)."""
    merge = (train or {}).get("merge")
    if not merge:
        return ""
    applied = (evaluation or {}).get("predict_applied")
    if applied is not None and (not applied["instances"] or "merge" in applied):  # what predict applied
        used = applied["merge"] if applied["instances"] else None
    else:  # (an evaluation from before: the setting it was made with)
        used = ((evaluation or {}).get("predict_settings") or {}).get("predict_args.merge", merge["limit"])
    if used is None:
        return (
            f'<p class="note">Train chose the merge limit {merge["limit"]:g} for touching objects; the scored '
            "predictions were made without objects (predict_args.instances false): nothing merged.</p>"
        )
    if used != merge["limit"]:
        made = (evaluation or {}).get("predict_settings") or {}
        why = (
            "predict_args.seeds footprint" if made.get("predict_args.seeds") == "footprint" else "predict_args.merge 0"
        )
        how = f"merged at {used:g}" if used else f"kept apart ({why})"
        return (
            f'<p class="note">Train chose the merge limit {merge["limit"]:g} for touching objects; in the scored '
            f"predictions touching objects were {how}.</p>"
        )
    f1 = merge["object_f1"]
    if not merge["limit"]:
        return (
            f'<p class="note">Touching objects are kept apart: no merge limit (predict_args.merge) did better on the '
            f"validation chips than none (object F1 {f1['0']:.3f}).</p>"
        )
    limit = f"{merge['limit']:g}"
    return (
        f'<p class="note">Touching objects are merged where the boundary band along their border averages under '
        f"{limit} (predict_args.merge): validation object F1 {f1[limit]:.3f}, against {f1['0']:.3f} unmerged.</p>"
    )


def _seed_note(train: dict[str, Any] | None, evaluation: dict[str, Any] | None = None) -> str:
    """Where train chose to start the watershed's seeds (a U-Net's metrics.json), as a paragraph ("" without);
    with the seed threshold of the scored predictions where that was another (``evaluation``'s predict
    record)."""
    seeds = (train or {}).get("seeds")
    if not seeds:
        return ""
    f1, q, default = seeds["object_f1"], f"{seeds['fraction']:g}", f"{seeds['default']:g}"
    base = seeds.get("default_f1", f1[default])  # (the default's best over the merge limits, which the rule read)
    noise = f", {seeds['standard_error']:.3f}" if "standard_error" in seeds else ""
    if q == default:
        text = (
            f"The watershed's seeds start at the default {q} of the way from the decision threshold to 1 "
            f"({seeds['threshold']:.3f}): validation object F1 {base:.3f}, and no other start beat it by more than "
            f"one standard error{noise}."
        )
    else:
        text = (
            f"The watershed's seeds start {q} of the way from the decision threshold to 1 ({seeds['threshold']:.3f}; "
            f"predict_args.seed_threshold): validation object F1 {f1[q]:.3f}, against {base:.3f} from the default "
            f"{default}, beyond one standard error{noise}."
        )
    applied = (evaluation or {}).get("predict_applied") or {}
    made = (evaluation or {}).get("predict_settings") or {}
    used = applied.get("seed_threshold")
    if applied.get("instances") is False:
        text += " The scored predictions were made without objects (predict_args.instances false): nothing seeded."
    elif used is not None and abs(used - seeds["threshold"]) > 5e-4:
        if made.get("predict_args.seed_threshold") is not None:
            why = "predict_args.seed_threshold"
        elif made.get("predict_args.seeds") == "footprint":
            why = "predict_args.seeds footprint: from the roof probability, halfway"
        elif made.get("predict_args.threshold") is not None:
            why = "the same share of the way from predict_args.threshold"
        elif made.get("predict_args.tta"):
            why = "the same share of the way from the threshold of test-time augmentation"
        else:
            why = "other settings"
        text += f" The scored predictions were seeded from {used:.3f} ({why})."
    return f'<p class="note">{text}</p>'


def _errors_note(evaluation: dict[str, Any] | None) -> str:
    """Why the unmatched polygons of an evaluation are unmatched (its polygon_errors), as a paragraph ("" without)."""
    errors = (evaluation or {}).get("polygon_errors")
    if not errors or not (evaluation["polygon"]["fp"] or evaluation["polygon"]["fn"]):
        return ""
    f, m = errors["false"], errors["missed"]

    def n(count: int, many: str, one: str) -> str:  # "3 hold", "1 holds"
        return f"{count} {one if count == 1 else many}"

    return (
        f'<p class="note">Polygon errors ({evaluation["split"]}): of the {evaluation["polygon"]["fp"]} false roofs, '
        f"{n(f['merges'], 'hold', 'holds')} two true roofs or more, {n(f['misfits'], 'hold', 'holds')} one but "
        f"{'misses' if f['misfits'] == 1 else 'miss'} the IoU (too large or offset), {n(f['pieces'], 'lie', 'lies')} "
        f"on roofs without holding one (pieces, or astride two) and {n(f['off_roofs'], 'lie', 'lies')} mostly off the "
        f"true roofs; of the {evaluation['polygon']['fn']} missed roofs, {n(m['merged'], 'were', 'was')} found "
        f"together with another, {m['misfit']} inside one object too large or offset, {m['split']} in pieces and "
        f"{m['not_found']} not found (under half covered). Merges are for a U-Net's boundary band and the merge limit "
        "to separate; pieces and roofs not found are the footprint's.</p>"
    )


def _model_sections(results: list[ModelResult], split: str) -> str:
    parts = []
    for r in results:
        pictures = [_img(r.folder / name, f"{r.model}: {caption}") for name, caption in TRAINING_PICTURES
                    if (r.folder / name).is_file()]  # fmt: skip
        ev = r.evaluation(split)
        if ev:
            folder = r.folder / "evaluation" / ev["split"]
            pictures += [_img(folder / name, f"{r.model}, {ev['split']}: {caption}") for name, caption in
                         EVALUATION_PICTURES if (folder / name).is_file()]  # fmt: skip
        table = _classes_table(ev["classes"]) if ev and ev.get("classes") else ""
        table = (
            _object_filter_note((r.train or {}).get("object_filter"), ev)
            + _seed_note(r.train, ev)
            + _merge_note(r.train, ev)
            + _tta_note(r.train)
            + _errors_note(ev)
            + table
        )
        if pictures or table:
            parts.append(f'<h3 id="model-{html.escape(r.model)}">{html.escape(r.model)}</h3>' + table
                         + "".join(pictures))  # fmt: skip
    return "".join(parts) or "<p>No pictures yet.</p>"


def write_report(settings: Settings, tree: DataTree, overrides: Sequence[str] = ()) -> Path:
    """Write results/EXPERIMENT/report.html: one self-contained page about this experiment (``overrides``: the
    --set items of the command writing it, named where the page judges the models by them)."""
    split = settings.evaluate_args.split
    results = model_results(tree.results)
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>roof-classify: {html.escape(tree.experiment)}</title>
<style>{_CSS}</style></head>
<body><main>
<h1>roof-classify &mdash; experiment {html.escape(tree.experiment)}</h1>
<p class="meta">Written {now} from {html.escape(str(tree.results))}. Models: {", ".join(r.model for r in results) or "none"}.</p>
<nav><a href="#metrics">Metrics</a><a href="#settings">Settings</a><a href="#data">Data</a><a href="#models">Training and evaluation</a></nav>
<h2 id="metrics">Metrics</h2>
{_metrics_section(results, split)}{_outdated_note(results, settings, tree, overrides)}
<h2 id="settings">Settings</h2>
{_settings_section(settings)}
<h2 id="data">Data</h2>
{_data_section(tree)}
<h2 id="models">Training and evaluation</h2>
{_model_sections(results, split)}
</main></body></html>
"""
    path = tree.results / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
