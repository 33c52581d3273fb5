#!/usr/bin/env python3
"""Validates Kubernetes manifests against the API's schemas, offline.

    python3 validate.py DIR --kubernetes-version 1.30.0 [--kubernetes-version ...]

Reads every *.yaml under DIR (recursively; every document in each file),
and validates each document with `kubernetes-validate` (its schemas are
bundled in the package: no cluster, no network) in strict mode: a field
the API does not know fails, as `kubectl apply` with server-side field
validation would fail it. A kind or apiVersion without a schema fails too
(the library's command line only warns), and so does a mapping with a
key given twice (YAML parsers keep the last one silently; the API server
rejects it).

On success, prints one JSON line: {"documents": [{"file": PATH relative to
DIR, "document": {...}}, ...]} for the caller's own checks, and exits 0.
Otherwise prints every problem on stderr and exits 1.
"""

import argparse
import json
import pathlib
import sys

import kubernetes_validate
import yaml


class StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping."""


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def problems_of(doc, versions):
    """What the schemas of each version say about one document."""
    found = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(top)"
            found.append(f"Kubernetes {version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            found.append(f"Kubernetes {version}: {e.message}")
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=pathlib.Path)
    parser.add_argument("--kubernetes-version", action="append", required=True)
    args = parser.parse_args()

    files = sorted(args.dir.rglob("*.yaml"))
    if not files:
        print(f"no *.yaml under {args.dir}", file=sys.stderr)
        return 1
    documents, problems = [], []
    for path in files:
        rel = str(path.relative_to(args.dir))
        try:
            docs = [d for d in yaml.load_all(path.read_text(), Loader=StrictLoader) if d]
        except yaml.YAMLError as e:
            problems.append(f"{rel}: {e}")
            continue
        for doc in docs:
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                problems.append(f"{rel}: a document without kind and apiVersion")
                continue
            name = f"{doc['kind']}/{doc.get('metadata', {}).get('name')}"
            problems += [f"{rel}: {name}: {p}" for p in problems_of(doc, args.kubernetes_version)]
            documents.append({"file": rel, "document": doc})
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(json.dumps({"documents": documents}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
