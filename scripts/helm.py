#!/usr/bin/env python3
"""Helm's own library (helm-python-sdk, Helm v4 as a shared library) for the Rust tests, one action per run:

  helm.py render  CHART RELEASE NAMESPACE VALUES_JSON              -> the rendered manifests, a JSON list
  helm.py install CHART RELEASE NAMESPACE VALUES_JSON KUBECONFIG  -> {"revision": N, "status": ..., "manifest": [...]}
  helm.py upgrade CHART RELEASE NAMESPACE VALUES_JSON KUBECONFIG  -> {"revision": N, "status": ..., "manifest": [...]}
  helm.py uninstall     RELEASE NAMESPACE KUBECONFIG              -> {"info": ...}

The tests run it with the venv `scripts/setup.sh` installs ($OUTBOX_CACHE/manifests-venv). Errors: exit 1 and
Helm's message on stderr (one line).
"""

import json
import sys

import yaml
from helm_python import chart as helm_chart
from helm_python import config as helm_config


def docs(manifest_text):
    return [d for d in yaml.safe_load_all(manifest_text) if d]


def main(argv):
    action = argv[1]
    if action == "render":
        chart, release, namespace, values = argv[2:6]
        rendered = helm_chart.Chart.load(chart).render(
            json.loads(values), name=release, namespace=namespace, is_install=True
        )
        out = []
        for path, text in sorted(rendered.items()):
            if path.endswith(".yaml"):
                out.extend(docs(text))
        return out
    if action in ("install", "upgrade"):
        chart, release, namespace, values, kubeconfig = argv[2:7]
        with helm_config.Config(kubeconfig_path=kubeconfig, namespace=namespace) as cfg:
            run = cfg.install if action == "install" else cfg.upgrade
            release_info = run(chart, release, json.loads(values), namespace=namespace, timeout=120)
        return {
            "revision": release_info.get("revision"),
            "status": release_info.get("status"),
            "manifest": docs(release_info.get("manifest", "")),
        }
    if action == "uninstall":
        release, namespace, kubeconfig = argv[2:5]
        with helm_config.Config(kubeconfig_path=kubeconfig, namespace=namespace) as cfg:
            result = cfg.uninstall(release, timeout=120)
        return {"info": result.get("info")}
    raise SystemExit(f"helm.py: unknown action {action!r}")


if __name__ == "__main__":
    try:
        print(json.dumps(main(sys.argv)))
    except Exception as e:  # Helm's errors: one line for the test's failure message
        print(f"helm.py {sys.argv[1]}: {type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr)
        sys.exit(1)
