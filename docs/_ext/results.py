"""Sphinx extension: tables from the benchmark results in ``benchmarks/results/``.

Each result is a JSON file named ``<case>-<YYYY-MM-DD>.json`` (one per case and date) holding::

    {"case": "busy-accelerator", "date": "2026-11-28", "title": "...",
     "machine": "...", "command": "python benchmarks/busy.py", "trees": {"before": "0666d6d"},
     "raw": "busy-accelerator-2026-11-28.txt",          # optional raw output(s) beside it
     "goals": [{"goal": "...", "script": "busy.py", "target": ">= 0.90",
                "before": "0.80 (0.79-0.82)", "result": "0.92 (0.90-0.93)"}],   # optional
     "tables": [{"title": "...", "columns": ["...", ...], "rows": [[...], ...]}],
     "notes": "..."}                                     # optional

Directives (the tables are built at build time; nothing generated is committed):

``.. results:: <case>-<date>``
    the file's title, setting, and every table in it;
``.. results-goals::``
    one table of every goal: target, the earliest "before", and the result on each date.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx.util import logging

logger = logging.getLogger(__name__)

RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results")
NAME = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*-\d{4}-\d{2}-\d{2}$")
REQUIRED = ("case", "date", "title", "tables")


def load_all() -> dict[str, dict[str, Any]]:
    """Every result file by stem, checked against its name; problems are Sphinx warnings."""
    out: dict[str, dict[str, Any]] = {}
    for fn in sorted(os.listdir(RESULTS)) if os.path.isdir(RESULTS) else []:
        if not fn.endswith(".json"):
            continue
        stem = fn[:-5]
        path = os.path.join(RESULTS, fn)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            logger.warning("%s: missing keys %s", path, missing)
        elif not NAME.match(stem) or stem != f"{data['case']}-{data['date']}":
            logger.warning("%s: the name must be <case>-<date> of its contents", path)
        for t in data.get("tables", []):
            for row in t["rows"]:
                if len(row) != len(t["columns"]):
                    logger.warning("%s: table %r has a row of %d cells for %d columns",
                                   path, t.get("title"), len(row), len(t["columns"]))
        for raw in raw_files(data):
            if not os.path.exists(os.path.join(RESULTS, raw)):
                logger.warning("%s: raw file %s does not exist", path, raw)
        out[stem] = data
    return out


def raw_files(data: dict[str, Any]) -> list[str]:
    """``raw`` is one file name or a list of them (a session's output may serve several cases)."""
    raw = data.get("raw") or []
    return [raw] if isinstance(raw, str) else list(raw)


def cell(value: Any) -> nodes.entry:
    entry = nodes.entry()
    entry += nodes.paragraph(text="" if value is None else str(value))
    return entry


def table(columns: list[str], rows: list[list[Any]], title: str | None) -> nodes.table:
    tab = nodes.table(classes=["results"])
    if title:
        tab += nodes.title(text=title)
    group = nodes.tgroup(cols=len(columns))
    tab += group
    for _ in columns:
        group += nodes.colspec(colwidth=1)
    head = nodes.thead()
    hrow = nodes.row()
    for c in columns:
        hrow += cell(c)
    head += hrow
    group += head
    body = nodes.tbody()
    for r in rows:
        row = nodes.row()
        for v in r:
            row += cell(v)
        body += row
    group += body
    return tab


class ResultsDirective(Directive):
    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        stem = self.arguments[0]
        env = self.state.document.settings.env
        env.note_dependency(os.path.abspath(os.path.join(RESULTS, stem + ".json")))
        data = load_all().get(stem)
        if data is None:
            return [self.state.document.reporter.warning(
                f"no benchmark result {stem}.json in benchmarks/results/", line=self.lineno)]
        setting = [f"Date: {data['date']}."]
        for key, label in (("machine", "Machine"), ("command", "Command")):
            if data.get(key):
                setting.append(f"{label}: {data[key]}.")
        if data.get("trees"):
            setting.append("Trees: " + ", ".join(f"{k} = {v}" for k, v in data["trees"].items()) + ".")
        raws = raw_files(data)
        raw = (" Raw output: " + ", ".join(f"benchmarks/results/{r}" for r in raws) + ".") if raws else ""
        out: list[nodes.Node] = [nodes.paragraph(
            text=" ".join(setting) + f" Data: benchmarks/results/{stem}.json." + raw)]
        for t in data["tables"]:
            out.append(table(t["columns"], t["rows"], t.get("title")))
        if data.get("notes"):
            out.append(nodes.paragraph(text=data["notes"]))
        return out


class GoalsDirective(Directive):
    def run(self) -> list[nodes.Node]:
        goals: dict[str, dict[str, Any]] = {}
        dates: list[str] = []
        env = self.state.document.settings.env
        for stem, data in load_all().items():
            env.note_dependency(os.path.abspath(os.path.join(RESULTS, stem + ".json")))
            for g in data.get("goals", []):
                row = goals.setdefault(g["goal"], {"script": g.get("script", ""),
                                                   "target": g.get("target", ""),
                                                   "before": None, "results": {}})
                if g.get("before") is not None and row["before"] is None:
                    row["before"] = g["before"]
                row["results"][data["date"]] = g["result"]
                if data["date"] not in dates:
                    dates.append(data["date"])
        dates.sort()
        columns = ["goal", "script", "target", "before"] + dates
        rows = [[name, g["script"], g["target"], g["before"] or "-"]
                + [g["results"].get(d, "-") for d in dates] for name, g in goals.items()]
        return [table(columns, rows, None)]


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("results", ResultsDirective)
    app.add_directive("results-goals", GoalsDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
