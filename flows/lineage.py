"""Run lineage in the open-source Prefect UI: content hashes of every artefact, and assets.

The asset graph view exists only in Prefect Cloud; in the open-source UI lineage is the parent /
child flow-run graph, a lineage table artifact (artefact → path → content hash → made from), and
the `prefect.asset.*` events that `materialize` records in the Event Feed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE

from cleaning.errors import one_line


def content_hash(path: str | Path) -> str:
    """xxh3-128 of a file's bytes ('' when it does not exist)."""
    from cleaning.inputs import content_hash as hash_file

    path = Path(path)
    return hash_file(str(path))[0] if path.is_file() else ""


def asset_key(path: str | Path) -> str:
    """`file://` and the absolute path, as an asset key: the path's own characters (a Chinese file name as it
    is: `Path.as_uri()` percent-encodes it, and Prefect refuses `%` in a key), each one Prefect refuses in a
    key (a space, `#`, `%`, quotes, brackets, ...) written `_`."""
    from prefect.types.names import RESTRICTED_ASSET_CHARACTERS

    path = Path(path).resolve().as_posix()
    return "file://" + "".join("_" if ch in RESTRICTED_ASSET_CHARACTERS else ch for ch in path)


def _note(path: str, metadata: dict[str, Any]) -> dict[str, Any]:
    from prefect.assets import add_asset_metadata

    add_asset_metadata(asset_key(path), metadata)
    return metadata


# Upstream assets one record names at most. Prefect puts every upstream asset of a materialisation into its
# event's related resources, beside the run's own (flow, task run, deployment, …), and drops an event with
# more than 100 of them (`events.maximum_related_resources`): the corpus of a few hundred files lost its
# lineage. Each upstream asset is also an event of its own (`prefect.asset.referenced`).
UPSTREAM_LIMIT = 50


def upstream_paths(paths: Sequence[str | Path], limit: int = UPSTREAM_LIMIT) -> list[Path]:
    """`paths` resolved; where there are more than `limit`, the directories that hold them: every path
    replaced by its parent, a level at a time, until at most `limit` remain (or only the root does)."""
    def outermost(found: set[Path]) -> set[Path]:  # a path under another one adds nothing
        return {p for p in found if not any(above in found for above in p.parents)}

    current = {Path(p).resolve() for p in paths}
    while len(current) > limit:
        parents = outermost({p.parent for p in current})
        if parents == current:
            break
        current = parents
    return sorted(current)


def record_asset(path: str | Path, upstream: Sequence[str | Path], name: str, by: str,
                 metadata: dict[str, Any]) -> str | None:
    """Materialise `file://PATH` with its upstream files (past `UPSTREAM_LIMIT`, the directories that hold
    them) as a Prefect asset; returns the key."""
    from prefect.assets import Asset, AssetProperties, materialize

    key = asset_key(path)
    try:
        asset = Asset(key=key, properties=AssetProperties(name=name))
        made_from = upstream_paths(upstream)
        deps = [Asset(key=asset_key(p)) for p in made_from]
    except ValueError as exc:  # a key longer than Prefect takes (512 characters)
        from prefect.events import emit_event

        get_run_logger().warning("%s is not a valid asset key (%s): emitting a plain event instead", key,
                                 one_line(exc))
        emit_event(f"pangu.{by}.written", resource={"prefect.resource.id": f"pangu.{by}.{Path(path).name}"},
                   payload={"path": str(path), **metadata})
        return None
    if len(made_from) < len(upstream):
        get_run_logger().info("%s: made from %d files, recorded as made from the %s that hold them: %s", name,
                              len(upstream), "directory" if len(made_from) == 1 else f"{len(made_from)} directories",
                              ", ".join(str(p) for p in made_from[:3]) + (", …" if len(made_from) > 3 else ""))
    record = materialize(asset, by=by, asset_deps=deps, name=f"record-{by}", cache_policy=NO_CACHE)(_note)
    record(str(path), metadata)
    return key
