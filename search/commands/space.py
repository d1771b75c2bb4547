"""`stl10-search space`: each family's parameters as the search sees them, what --param and --space can change."""

from __future__ import annotations

import argparse
import json
from typing import Any

from search.commands.options import models
from search.family import Family, get_family


def space_rows(family: Family) -> list[dict[str, Any]]:
    """One row per parameter: its searched range or choices, the reference setting, valid values, when it applies."""
    reference = family.resolve()
    return [{"parameter": dim.name, "searched": dim.describe(), "low": dim.low, "high": dim.high, "log": dim.log,
             "choices": list(dim.choices) if dim.choices is not None else None,
             "reference": reference.get(dim.name),
             "valid": list(dim.allowed) if dim.named else (list(dim.limits) if dim.limits else None),
             "conditional": dim.when is not None, "help": dim.help}
            for dim in family.space]


def run_space(args: argparse.Namespace) -> int:
    chosen = [get_family(name) for name in models(args)]
    if args.json:
        print(json.dumps([{"model": f.name, "title": f.title, "origin": f.origin, "n_trials": f.n_trials,
                           "parameters": space_rows(f)} for f in chosen], indent=2))
        return 0
    for family in chosen:
        rows = [("parameter", "searched", "reference", "valid values", "notes")]
        for row in space_rows(family):
            valid = row["valid"]
            shown = "-" if valid is None else ", ".join(valid) if row["choices"] and all(
                isinstance(v, str) for v in valid) else f"{valid[0]:g}..{valid[1]:g}"
            rows.append((row["parameter"], row["searched"], "-" if row["reference"] is None else str(row["reference"]),
                         shown, (row["help"] + (" (conditional)" if row["conditional"] else "")).strip()))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        print(f"{family.name}: {family.title} ({family.origin}; default budget {family.n_trials} trials)")
        for row in rows:
            print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
        print()
    return 0
