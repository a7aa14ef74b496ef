#!/usr/bin/env python3
"""Checks what ships to Kubernetes with real tools, offline (run by `make check-manifests`, part of `make test`):

- the Helm chart is linted and rendered by Helm's own library (helm-python-sdk: Helm v4 compiled as a shared
  library; no helm binary and no cluster needed), with default values and with the demo stack;
- every rendered manifest and every object the operator creates (`planned.yaml`) validates against the
  Kubernetes 1.37 OpenAPI schemas in strict mode (kubernetes-validate: unknown fields fail); custom resources
  validate against the generated CRDs' schemas;
- values.yaml passes values.schema.json and bad values are refused by Helm's own schema validation, naming
  the key;
- the custom resources in examples/ validate against the generated CRDs (and the CRD schema does refuse);
- kind-config.yaml maps the NodePorts the chart uses.

Usage: check-manifests.py CHART PLANNED_YAML CRD_DIR KIND_CONFIG EXAMPLES_DIR. Prints one line per check; exit 1 on failure.
"""

import json
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from helm_python import chart as helm_chart
from helm_python import errors as helm_errors

K8S_VERSION = "1.37.0"
# Kinds that are not Kubernetes built-ins: validated elsewhere or not at all (the Prometheus Operator's
# kinds need its CRDs, which this repository does not carry; the rules are checked by promtool).
CUSTOM = {"OutboxRelay", "ConsumerGroup"}
SKIPPED = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL {msg}")


def ok(msg):
    print(f"ok   {msg}")


def crd_validators(crd_dir):
    out = {}
    for f in sorted(Path(crd_dir).glob("*.yaml")):
        crd = yaml.safe_load(f.read_text())
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        out[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    return out


def validate_docs(docs, crds, what):
    kinds = []
    for d in docs:
        kind = d.get("kind")
        name = f"{what}: {kind}/{d.get('metadata', {}).get('name')}"
        kinds.append(kind)
        if kind in SKIPPED:
            ok(f"{name} (not a Kubernetes built-in; not validated)")
            continue
        if kind in CUSTOM:
            errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in crds[kind].iter_errors(d)]
            if errors:
                fail(f"{name} against its CRD: {errors}")
            else:
                ok(f"{name} valid against the generated CRD")
            continue
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            ok(f"{name} valid against Kubernetes {K8S_VERSION} (strict)")
        except Exception as e:  # ValidationError, SchemaNotFoundError
            fail(f"{name}: {getattr(e, 'message', e)}")
    return kinds


def render(chart, values, release="outbox-operator", namespace="outbox"):
    manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for d in yaml.safe_load_all(text):
            if d:
                docs.append(d)
    return manifests, docs


def main():
    chart_dir, planned, crd_dir, kind_config, examples = sys.argv[1:6]
    crds = crd_validators(crd_dir)
    chart = helm_chart.Chart.load(chart_dir)

    demo = {"demo": {"enabled": True, "kafkaUi": {"enabled": True}}, "serviceMonitor": {"enabled": True},
            "podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
            "grafanaDashboard": {"enabled": True}}
    for label, values in [("default values", None), ("demo values", demo)]:
        report = helm_chart.lint(chart_dir, values, strict=True, kube_version="v1.37.0")
        errors = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
        if errors:
            fail(f"helm lint --strict ({label}): {errors}")
        else:
            ok(f"helm lint --strict ({label})")

    manifests, docs = render(chart, None)
    kinds = validate_docs(docs, crds, "chart (default values)")
    expected = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"}
    if set(kinds) != expected:
        fail(f"default render kinds {sorted(set(kinds))} != {sorted(expected)}")
    # The CRD chart renders exactly the generated CRDs (crds/), kept on uninstall unless keep=false.
    crd_chart_dir = str(Path(chart_dir).parent / "outbox-operator-crds")
    report = helm_chart.lint(crd_chart_dir, None, strict=True, kube_version="v1.37.0")
    errors = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
    if errors:
        fail(f"helm lint --strict (CRD chart): {errors}")
    crd_chart = helm_chart.Chart.load(crd_chart_dir)
    _, crd_docs = render(crd_chart, None, release="outbox-operator-crds")
    validate_docs(crd_docs, crds, "CRD chart")
    generated = {d["metadata"]["name"]: d for d in (yaml.safe_load(p.read_text()) for p in sorted(Path(crd_dir).glob("*.yaml")))}
    rendered = {d["metadata"]["name"]: d for d in crd_docs if d["kind"] == "CustomResourceDefinition"}
    if set(rendered) != set(generated) or any(rendered[n]["spec"] != generated[n]["spec"] for n in generated):
        fail(f"CRD chart's CRDs {sorted(rendered)} differ from crds/ {sorted(generated)}")
    elif any(d["metadata"].get("annotations", {}).get("helm.sh/resource-policy") != "keep" for d in rendered.values()):
        fail("CRD chart's CRDs lack helm.sh/resource-policy: keep")
    else:
        ok(f"CRD chart renders crds/ and keeps them on uninstall ({', '.join(sorted(rendered))})")
    _, not_kept = render(crd_chart, {"keep": False}, release="outbox-operator-crds")
    if any("helm.sh/resource-policy" in d["metadata"].get("annotations", {}) for d in not_kept):
        fail("keep=false still keeps the CRDs")
    images = {
        c["image"]
        for d in docs
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    if images != {"ghcr.io/outbox-operator/outbox-operator:0.1.0"}:
        fail(f"operator image {images}")
    env = {
        e["name"]: e.get("value")
        for d in docs
        if d["kind"] == "Deployment"
        for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    if env.get("OPERATOR_RELAY_IMAGE") != "ghcr.io/outbox-operator/outbox-relay:0.1.0":
        fail(f"relay image passed to the operator: {env.get('OPERATOR_RELAY_IMAGE')}")
    operators = [d for d in docs if d["kind"] == "Deployment"]
    strategies = {d["spec"].get("strategy", {}).get("type") for d in operators}
    if strategies != {"RollingUpdate"} or any(d["spec"]["replicas"] != 2 for d in operators):
        fail(f"operator Deployment strategy {strategies}: expected RollingUpdate with 2 leader-elected replicas")
    if not {"POD_NAME", "POD_NAMESPACE"} <= set(env):
        fail("the operator's identity and Lease namespace (POD_NAME, POD_NAMESPACE) are not passed down")
    if not any(p.endswith("NOTES.txt") for p in manifests):
        fail("NOTES.txt not rendered")

    _, docs = render(chart, demo)
    kinds = validate_docs(docs, crds, "chart (demo)")
    need = {"StatefulSet": 2, "OutboxRelay": 1, "ConsumerGroup": 2, "Secret": 2, "ServiceMonitor": 1,
            "PodMonitor": 1, "PrometheusRule": 1}
    for kind, n in need.items():
        if kinds.count(kind) != n:
            fail(f"demo render: {kinds.count(kind)} {kind}, expected {n}")
    # The PrometheusRule carries exactly the rules file promtool checks and tests.
    rule = [d for d in docs if d["kind"] == "PrometheusRule"][0]
    tested = yaml.safe_load((Path(chart_dir) / "rules" / "outbox.rules.yaml").read_text())
    if rule["spec"] != tested:
        fail("PrometheusRule spec differs from rules/outbox.rules.yaml")
    else:
        ok(f"PrometheusRule holds rules/outbox.rules.yaml ({sum(len(g['rules']) for g in tested['groups'])} alerts)")
    dashboards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    shipped = json.loads((Path(chart_dir) / "dashboards" / "outbox.json").read_text())
    if len(dashboards) != 1 or json.loads(dashboards[0]["data"]["outbox-operator.json"]) != shipped \
            or dashboards[0]["metadata"]["labels"].get("grafana_dashboard") != "1":
        fail("dashboard ConfigMap missing, unlabelled, or not dashboards/outbox.json")
    else:
        ok(f"dashboard ConfigMap holds dashboards/outbox.json ({len(shipped['panels'])} panels)")
    monitor = [d for d in docs if d["kind"] == "PodMonitor"][0]
    names = monitor["spec"]["selector"]["matchExpressions"][0]["values"]
    if names != ["outbox-relay", "outbox-consumer"]:
        fail(f"PodMonitor selects {names}")
    groups = {d["metadata"]["name"]: d["spec"]["replicas"] for d in docs if d["kind"] == "ConsumerGroup"}
    relay = [d for d in docs if d["kind"] == "OutboxRelay"][0]
    if groups != {"pharmacy": 2, "notification": 1} or relay["spec"]["replicas"] != 2 \
            or relay["spec"]["coordination"]["mode"] != "Lease":
        fail(f"demo resources: groups {groups}, relay {relay['spec']}")
    else:
        ok("demo: OutboxRelay in Lease mode with 2 replicas, pharmacy ×2, notification ×1")
    node_ports = {
        p["nodePort"]
        for d in docs
        if d["kind"] == "Service" and d["spec"].get("type") == "NodePort"
        for p in d["spec"]["ports"]
    }
    mapped = {m["containerPort"] for n in yaml.safe_load(Path(kind_config).read_text())["nodes"]
              for m in n.get("extraPortMappings", [])}
    if node_ports != mapped:
        fail(f"NodePorts {sorted(node_ports)} vs kind-config.yaml mappings {sorted(mapped)}")
    else:
        ok(f"kind-config.yaml maps the chart's NodePorts {sorted(node_ports)}")

    try:
        chart.validate_schema(None)
        ok("values.yaml passes values.schema.json")
    except helm_errors.HelmError as e:
        fail(f"values.yaml against values.schema.json: {e}")
    for bad, key in [
        ({"demo": {"api": {"nodePort": 8080}}}, "nodePort"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"operator": {"logFormt": "json"}}, "logFormt"),
        ({"operator": {"replicas": 4}}, "replicas"),
        ({"demo": {"postgres": {"password": "short"}}}, "password"),
        ({"demo": {"relay": {"replicas": 0}}}, "replicas"),
    ]:
        try:
            chart.validate_schema(bad)
            fail(f"values {bad} accepted")
        except helm_errors.HelmError as e:
            if key in str(e):
                ok(f"values {bad} refused: {' '.join(str(e).split())[:140]}")
            else:
                fail(f"values {bad} refused without naming {key}: {e}")

    example_docs = [yaml.safe_load(f.read_text()) for f in sorted(Path(examples).glob("*.yaml"))]
    kinds = validate_docs(example_docs, crds, "examples")
    if sorted(set(kinds)) != ["ConsumerGroup", "OutboxRelay"]:
        fail(f"examples/ holds {kinds}: expected OutboxRelays and ConsumerGroups")
    no_kafka = {"apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": "x"},
                "spec": {"database": {"secretRef": {"name": "db", "key": "url"}}}}
    if crds["OutboxRelay"].is_valid(no_kafka):
        fail("the OutboxRelay CRD accepts a relay without spec.kafka")
    else:
        ok("the OutboxRelay CRD refuses a relay without spec.kafka")

    planned_docs = [d for d in yaml.safe_load_all(Path(planned).read_text()) if d]
    kinds = validate_docs(planned_docs, crds, "operator")
    # The chart's PodMonitor selects every pod the operator plans.
    for d in planned_docs:
        if d["kind"] != "Deployment":
            continue
        labels = d["spec"]["template"]["metadata"]["labels"]
        if not all(labels.get(e["key"]) in e["values"] for e in monitor["spec"]["selector"]["matchExpressions"]):
            fail(f"PodMonitor does not select the pods of Deployment/{d['metadata']['name']}: {labels}")
    if len(planned_docs) < 9:
        fail(f"only {len(planned_docs)} planned objects")

    if failures:
        print(f"{len(failures)} manifest check(s) failed")
        sys.exit(1)
    print("manifests: all checks passed")


if __name__ == "__main__":
    main()
