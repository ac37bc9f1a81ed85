"""``blipmon presets [--json]``: the built-in configurations by group, each with its one-line description."""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from blipmon.core import config, presets

    items = []
    for name in presets.names():
        cfg = config.validate(presets.get(name))
        items.append({"name": name, "description": cfg["description"], "config": cfg})
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    width = max(len(i["name"]) for i in items)
    group = None
    for i in sorted(items, key=lambda i: (presets.GROUPS.index(i["name"].split("/")[0]), i["name"])):
        g = i["name"].split("/")[0]
        if g != group:
            print(("\n" if group else "") + f"{g}/")
            group = g
        print(f"  {i['name'].ljust(width)}  {i['description']}")
    return 0
